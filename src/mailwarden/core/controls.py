"""Control IDs from ``shared/CONTROLS.md`` that code, events and reports name.

Public names: ``Control``.
Security: none (constants).
"""

from enum import StrEnum


class Control(StrEnum):
    """One requirement of the campus standards (Cal Poly ``CP-*``, Stanford ``SU-*``)."""

    CP_G1 = "CP-G1"  # gateway receives, scans, delivers all campus mail
    CP_G2 = "CP-G2"  # mailbox delivery
    CP_G3 = "CP-G3"  # distribution lists
    CP_R1 = "CP-R1"
    CP_R2 = "CP-R2"  # off-campus mail routes through the gateway
    CP_R3 = "CP-R3"
    CP_R4 = "CP-R4"  # abuse@ and postmaster@
    CP_R5 = "CP-R5"  # service logs kept 60 days
    CP_S1 = "CP-S1"
    CP_S2 = "CP-S2"
    CP_S3 = "CP-S3"
    CP_E1 = "CP-E1"  # not an open relay
    CP_E2 = "CP-E2"  # directory harvest defence
    CP_E3 = "CP-E3"  # fail closed when a scanner is down
    CP_E4 = "CP-E4"  # viruses blocked
    CP_E5 = "CP-E5"
    CP_A1 = "CP-A1"
    SU_1 = "SU-1"
    SU_2 = "SU-2"
    SU_3 = "SU-3"
    SU_4 = "SU-4"
    SU_5 = "SU-5"
    SU_6 = "SU-6"  # never relay mail that originated outside
    SU_7 = "SU-7"
    SU_8 = "SU-8"  # no AUTH without TLS
    SU_9 = "SU-9"
    SU_10 = "SU-10"
    SU_11 = "SU-11"
    SU_12 = "SU-12"
