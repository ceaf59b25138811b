"""
Chorus's benchmark: the same WebRTC load against Chorus, Janus VideoRoom and an aiortc MediaRelay
baseline. Run it with ``python -m chorus.bench`` (``make bench``); see docs/performance.md.
"""
