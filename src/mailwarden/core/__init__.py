"""Shared types of every pipeline stage: sessions, envelopes, decisions, events, controls.

Stages depend on ``core`` and on the next stage's public function, never sideways.
Security: none (data definitions only).
"""
