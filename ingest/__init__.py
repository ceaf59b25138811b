"""
Chorus ingest: the protocol level of bringing encoders and cameras into rooms.

RTMP (:mod:`.rtmp`) and SRT (:mod:`.srt`) listeners and a URL puller (:mod:`.pull`) turn what arrives into the
same media objects (:mod:`.media`); :mod:`.h264` packetizes H.264 for RTP and :mod:`.transcode` makes Opus from
AAC and browser-safe H.264 from anything else, off the event loop. This package never imports ``signaling``.
"""
