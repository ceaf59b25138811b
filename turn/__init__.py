"""
TURN for Chorus, with coturn: :mod:`~turn.credentials` mints TURN REST credentials, :mod:`~turn.config`
renders a hardened ``turnserver.conf``, :mod:`~turn.check` checks a running server step by step through
the small STUN/TURN client in :mod:`~turn.client`, and :mod:`~turn.cli` is ``chorus turn``.
"""
