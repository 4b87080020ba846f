"""SMTP AUTH backends (SU-8): the user database (argon2id) and LDAP simple bind, failed-auth
throttling, and the service that ties them together for the SMTP edge (``smtp.auth``).

Public names: see ``auth.base`` (``AuthResult``, ``Authenticator``), ``auth.service``
(``AuthService``, ``build_auth_service``), ``auth.settings`` (``AuthSettings``).
Security: handles passwords in memory only; nothing here logs or stores a password.
"""
