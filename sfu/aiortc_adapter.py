"""
The one place where Chorus touches aiortc's and aioice's private API.

Chorus forwards RTP without decoding or encoding, which aiortc's public API does not offer. Everything it needs
from aiortc/aioice internals — in the server, the Python client, the benchmark and the test helpers — is reached
through the functions below, and :func:`check` verifies at startup that every attribute exists in the installed
aiortc, failing with a clear message otherwise. aiortc is pinned exactly in ``pyproject.toml`` for that reason.
Nothing here changes aiortc or aioice when imported: process-wide changes (:func:`set_host_addresses`,
:func:`guard_stun_parsing`) are explicit calls made by the server and the clients.

What is used, and why:

* ``aiortc.rtcrtpreceiver.decoder_worker`` — replaced by a worker that drops encoded frames, so the SFU
  never decodes (the receiver would otherwise queue decoded frames nobody reads, without bound). MCU rooms
  undo that per receiver (:func:`enable_decoding`) and read the decoded frames.
* ``RTCRtpReceiver._handle_rtp_packet`` / ``RTCRtpSender._handle_rtcp_packet`` — replaced *on the
  instance* (aiortc's RtpRouter looks them up per instance) to see every packet.
* ``RTCRtpReceiver.__codecs`` / ``__rtx_ssrc`` / ``_send_rtcp_pli`` / ``__remote_streams`` — payload types,
  RTX SSRC mapping, keyframe requests towards a publisher, and the per-SSRC receive statistics that receiver
  reports are built from (the benchmark's counting receiver keeps them).
* ``RTCRtpSender._ssrc`` / ``__started`` / ``__rtp_header_extensions_map`` / ``__mid`` / ``__force_keyframe``
  and its stats counters — the SSRC to write, to know when a subscriber's sender is negotiated, to serialize
  header extensions with the subscriber's IDs, to keep its sender reports honest, and (benchmark publishers
  that send pre-encoded video) to see a keyframe request.
* ``RTCRtpTransceiver._codecs`` — the codecs negotiated for a transceiver; reordered between
  ``setRemoteDescription`` and ``createAnswer`` (:func:`prefer_codec`) so a publish answer asks the client to
  send H.264 first when a room's HTTP egress can then pass it through untranscoded.
* ``RTCDtlsTransport._send_rtp`` — SRTP-protect and send one packet; on the hot path
  (:func:`direct_rtp_sender`) ``RTCDtlsTransport._state``/``_tx_srtp`` and aioice's
  ``Connection._nominated`` pair with its protocol's UDP transport, to do the same synchronously;
  ``RTCDtlsTransport._rx_srtp`` and ``Connection._protocols`` for the benchmark's receive fast path.
* ``aiortc.codecs.CODECS`` — aiortc's codec table (module-level, process-wide): :func:`offerable_codec` adds an
  H.264 entry for a profile aiortc does not list (Main, ...) the first time a source in that profile is offered,
  so the subscriber's answer is accepted (aiortc matches H.264 answers against this table by profile).
* ``OpusEncoder.codec`` — the libopus context of aiortc's encoder, to set the MCU mix's bit rate.
* ``RTCRtpTransceiver._headerExtensions`` and the ``rtcpFeedback`` of ``_codecs`` — edited per transceiver
  between ``setRemoteDescription`` and ``createAnswer``/``createOffer``, to negotiate what aiortc does not offer:
  the RID, repaired-RID and transport-wide-cc header extensions, and ``transport-cc`` feedback (simulcast and
  congestion control, see ``sfu/publish.py`` and ``sfu/subscribe.py``).
* ``RTCDtlsTransport._handle_rtp_data`` / ``_handle_rtcp_data`` — replaced *on the instance* to see every
  decrypted RTP/RTCP datagram of a connection first: arrival times for transport-cc feedback, routing of
  simulcast streams by MID/RID, and transport-cc feedback from subscribers (aiortc parses it as a NACK);
  ``RTCDtlsTransport._rtp_header_extensions_map`` and ``_rtp_router`` (its ``route_rtp`` and ``ssrc_table``) to
  parse and route packets as aiortc would, and to make learned simulcast SSRCs' sender reports reach the
  receiver; ``_send_rtp`` to send RTCP (it protects RTCP too). The router's ``senders`` table, so that RTCP about
  SSRCs a sender's owner writes itself (the benchmark's simulcast publisher, which aiortc cannot be) reaches
  that sender (:func:`register_sender_ssrc`).
* the ``_sock`` of the asyncio datagram transports under aioice's protocols, and the selector loop's
  ``_remove_reader``/``_add_reader`` for its descriptor — to read a publish connection's
  datagrams with the kernel's receive timestamps (``SO_TIMESTAMPNS``): transport-cc feedback must say when each
  packet *arrived*, not when a busy event loop got to it (:func:`kernel_arrival_times`).
* ``RTCRtpReceiver._send_rtcp_nack`` / ``__rtcp_ssrc`` — NACKs from Chorus's own receive path, and the SSRC its
  feedback is sent from.
* ``aioice.ice.get_host_addresses`` — to choose which host addresses the server advertises (aioice leaves
  loopback out, which a local browser needs).
* ``aioice.ice.Connection.get_component_candidates`` and ``Connection._protocols`` — wrapped so the host
  candidates' UDP sockets are bound inside ``rtc_min_port``..``rtc_max_port`` (aioice always binds port 0);
  the wrapper builds host candidates as aioice does (``aioice.candidate.candidate_foundation``/
  ``candidate_priority``), and leaves connections that use STUN or TURN to aioice (see
  :func:`set_port_range`).
* ``aioice.ice.StunProtocol.datagram_received`` and ``Connection._check_list`` — wrapped/read so a
  hostile datagram can neither kill a connection nor raise into the event loop (see
  :func:`guard_stun_parsing`); a protocol instance's ``datagram_received`` is also wrapped by the benchmark
  (:func:`intercept_datagrams`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aioice
import aioice.candidate
import aioice.ice
import aioice.turn
import aiortc
import aiortc.codecs
import aiortc.rtcrtpreceiver
from aiortc import RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs.opus import OpusEncoder
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import (
    RTCRtcpFeedback,
    RTCRtpCodecCapability,
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
)
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import AnyRtcpPacket, HeaderExtensionsMap, RtpPacket

from .errors import UnsupportedCodecError
from .rtp import h264_profile, same_codec

SUPPORTED_AIORTC = "1.16.0"

_logger = logging.getLogger("chorus.sfu.adapter")

RtpHandler = Callable[[RtpPacket, int], Awaitable[None]]
RtcpHandler = Callable[[AnyRtcpPacket], Awaitable[None]]


class AdapterError(RuntimeError):
    """The installed aiortc lacks an internal that Chorus relies on."""


_RECEIVER_ATTRS = (
    "_handle_rtp_packet",
    "_handle_rtcp_packet",
    "_send_rtcp_pli",
    "_RTCRtpReceiver__codecs",
    "_RTCRtpReceiver__rtx_ssrc",
    "_RTCRtpReceiver__decoder_thread",
    "_RTCRtpReceiver__decoder_queue",
    "_RTCRtpReceiver__remote_streams",
    "_RTCRtpReceiver__rtcp_ssrc",
    "_send_rtcp_nack",
)
_SENDER_ATTRS = (
    "_handle_rtcp_packet",
    "_ssrc",
    "_stream_id",
    "_track_id",
    "_RTCRtpSender__started",
    "_RTCRtpSender__rtp_header_extensions_map",
    "_RTCRtpSender__mid",
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__packet_count",
    "_RTCRtpSender__force_keyframe",
)


async def check() -> None:
    """
    Verify that every aiortc/aioice internal used by Chorus exists. Call it once at startup.

    :raises AdapterError: naming each missing attribute and the supported aiortc version.
    """
    problems: list[str] = []
    if aiortc.__version__ != SUPPORTED_AIORTC:
        problems.append(f"aiortc {aiortc.__version__} installed, Chorus is built for {SUPPORTED_AIORTC}")
    for module, name in (
        (aiortc.rtcrtpreceiver, "decoder_worker"),
        (aioice.ice, "get_host_addresses"),
        (aioice.ice, "StunProtocol"),
        (aiortc.rtp, "unwrap_rtx"),
    ):
        if not hasattr(module, name):
            problems.append(f"{module.__name__}.{name} is missing")
    if not hasattr(aioice.ice.Connection, "get_component_candidates"):
        problems.append("aioice.ice.Connection.get_component_candidates is missing")
    if not hasattr(RTCDtlsTransport, "_send_rtp"):
        problems.append("RTCDtlsTransport._send_rtp is missing")
    if not isinstance(getattr(aiortc.codecs, "CODECS", None), dict) or "video" not in aiortc.codecs.CODECS:
        problems.append("aiortc.codecs.CODECS (the codec table) is missing")

    # Instance attributes only exist on live objects: build a throwaway receiver and sender.
    pc = aiortc.RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="sendrecv")
        for attr in _RECEIVER_ATTRS:
            if not hasattr(transceiver.receiver, attr):
                problems.append(f"RTCRtpReceiver.{attr} is missing")
        for attr in _SENDER_ATTRS:
            if not hasattr(transceiver.sender, attr):
                problems.append(f"RTCRtpSender.{attr} is missing")
        for attr in ("_codecs", "_headerExtensions"):
            if not hasattr(transceiver, attr):
                problems.append(f"RTCRtpTransceiver.{attr} is missing")
        dtls = transceiver.sender.transport
        for attr in ("_state", "_tx_srtp", "_rx_srtp", "_handle_rtp_data", "_handle_rtcp_data",
                     "_rtp_header_extensions_map", "_rtp_router"):
            if not hasattr(dtls, attr):
                problems.append(f"RTCDtlsTransport.{attr} is missing")
        for attr in ("route_rtp", "ssrc_table", "senders"):
            if not hasattr(getattr(dtls, "_rtp_router", None), attr):
                problems.append(f"aiortc RtpRouter.{attr} is missing")
        connection = getattr(dtls.transport, "_connection", None)
        for attr in ("_nominated", "_check_list", "_protocols"):
            if not hasattr(connection, attr):
                problems.append(f"aioice Connection.{attr} is missing")
        if not hasattr(DtlsState, "CONNECTED"):
            problems.append("aiortc.rtcdtlstransport.State.CONNECTED is missing")
        if not hasattr(HeaderExtensionsMap(), "_HeaderExtensionsMap__ids"):
            problems.append("HeaderExtensionsMap.__ids is missing")
        if not hasattr(OpusEncoder(), "codec"):
            problems.append("OpusEncoder.codec is missing")
    finally:
        await pc.close()
    if problems:
        raise AdapterError(
            "Chorus cannot use the installed aiortc: "
            + "; ".join(problems)
            + f". Install aiortc=={SUPPORTED_AIORTC}."
        )


# --- decoding off -----------------------------------------------------------------------------------


def _discarding_decoder_worker(
    loop: asyncio.AbstractEventLoop, input_q: queue.Queue[Any], output_q: asyncio.Queue[Any], *args: Any
) -> None:
    """Stand-in for aiortc's decoder thread: drops encoded frames, ends the track when told to."""
    while input_q.get() is not None:
        pass
    asyncio.run_coroutine_threadsafe(output_q.put(None), loop)


def disable_decoding(receiver: RTCRtpReceiver) -> None:
    """
    Make ``receiver`` drop encoded frames instead of decoding them. Call before it starts (in the
    peer connection's ``track`` event, which aiortc emits before it starts receivers).

    aiortc's ``receive()`` starts its decoder thread without awaiting anything, so swapping the module's
    worker around that one call affects this receiver only, not other receivers in the process. The
    stand-in worker is then told to stop at once and the receiver forgets it, so aiortc no longer even
    queues assembled frames (a queue put and a thread wake-up per frame otherwise); its track simply ends.
    """
    original_receive = receiver.receive

    async def receive(parameters: Any) -> None:
        saved = aiortc.rtcrtpreceiver.decoder_worker
        aiortc.rtcrtpreceiver.decoder_worker = _discarding_decoder_worker  # type: ignore[assignment]
        try:
            await original_receive(parameters)
        finally:
            aiortc.rtcrtpreceiver.decoder_worker = saved
        if getattr(receiver, "_RTCRtpReceiver__decoder_thread", None) is not None:
            receiver._RTCRtpReceiver__decoder_queue.put(None)  # type: ignore[attr-defined]
            receiver._RTCRtpReceiver__decoder_thread = None  # type: ignore[attr-defined]

    receiver.receive = receive  # type: ignore[method-assign]


def enable_decoding(receiver: RTCRtpReceiver) -> None:
    """
    Undo :func:`disable_decoding` before the receiver starts: MCU rooms mix decoded frames. The receiver's
    ``track`` then yields every decoded frame, and must be read continuously (frames queue without bound).
    """
    vars(receiver).pop("receive", None)


# --- host candidates --------------------------------------------------------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses


def set_host_addresses(addresses: Iterable[str] | None) -> None:
    """
    Choose the host addresses that ICE gathers candidates on, process-wide.

    :param addresses: IP addresses (loopback allowed), or ``None`` for aioice's default (every non-loopback
        interface address).
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    chosen = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses


# --- media port range ------------------------------------------------------------------------------

_original_get_component_candidates = aioice.ice.Connection.get_component_candidates


async def _bind_in_range(loop: asyncio.AbstractEventLoop, factory: Callable[[], Any], address: str, low: int,
                         high: int) -> tuple[asyncio.DatagramTransport, Any]:
    """A UDP endpoint on ``address`` at a free port of ``low..high`` (tried from a random one on)."""
    size = high - low + 1
    start = random.randrange(size)
    for i in range(size):
        port = low + (start + i) % size
        try:
            transport, protocol = await loop.create_datagram_endpoint(factory, local_addr=(address, port))
            return transport, protocol
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
    raise OSError(errno.EADDRINUSE, f"no free UDP port in {low}-{high} on {address}")


def set_port_range(low: int | None, high: int | None) -> None:
    """
    Bind the host-candidate UDP sockets of ICE connections inside ``low..high``, process-wide (``None``:
    any port, aioice's default). Connections configured with a STUN or TURN server (clients, not the SFU)
    keep aioice's own gathering. When every port of the range is taken, the connection gets no host
    candidate on that address (logged), as aioice does when it cannot bind.
    """
    if low is None or high is None:
        aioice.ice.Connection.get_component_candidates = _original_get_component_candidates  # type: ignore[method-assign]
        return
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"bad port range {low}-{high}")

    async def get_component_candidates(self: aioice.ice.Connection, component: int, addresses: list[str],
                                       timeout: int = 5) -> list[aioice.Candidate]:
        if self.stun_server or self.turn_server:
            return await _original_get_component_candidates(self, component, addresses, timeout)
        loop = asyncio.get_running_loop()
        candidates = []
        for address in addresses:
            try:
                transport, protocol = await _bind_in_range(
                    loop, lambda: aioice.ice.StunProtocol(self), address, low, high)
            except OSError as exc:
                _logger.warning("cannot bind an ICE socket on %s in %d-%d: %s", address, low, high, exc)
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, aioice.turn.UDP_SOCKET_BUFFER_SIZE)
            host, port = transport.get_extra_info("sockname")[:2]
            protocol.local_candidate = aioice.Candidate(
                foundation=aioice.candidate.candidate_foundation("host", "udp", host),
                component=component, transport="udp",
                priority=aioice.candidate.candidate_priority(component, "host"),
                host=host, port=port, type="host",
            )
            candidates.append(protocol.local_candidate)
            self._protocols.append(protocol)
        return candidates

    aioice.ice.Connection.get_component_candidates = get_component_candidates  # type: ignore[method-assign]


# --- receiver (publisher side) ----------------------------------------------------------------------


def hook_receiver_rtp(receiver: RTCRtpReceiver, handler: RtpHandler) -> RtpHandler:
    """
    Route every RTP packet the receiver gets through ``handler`` first.

    :returns: the receiver's original handler, which ``handler`` should await afterwards so aiortc keeps
        its receive statistics, receiver reports and NACK generation.
    """
    original: RtpHandler = receiver._handle_rtp_packet
    receiver._handle_rtp_packet = handler  # type: ignore[method-assign,assignment]
    return original


async def receiver_handle_rtp(receiver: RTCRtpReceiver, packet: RtpPacket, arrival_time_ms: int) -> None:
    """Run aiortc's own receive path for ``packet`` (statistics, NACKs, jitter buffer, decoding)."""
    await RTCRtpReceiver._handle_rtp_packet(receiver, packet, arrival_time_ms)


def unhook_receiver_rtp(receiver: RTCRtpReceiver) -> None:
    """Undo :func:`hook_receiver_rtp` (drops the reference to the handler and what it holds)."""
    receiver.__dict__.pop("_handle_rtp_packet", None)


def receiver_codecs(receiver: RTCRtpReceiver) -> dict[int, RTCRtpCodecParameters]:
    """Payload type → negotiated codec of a started receiver."""
    codecs: dict[int, RTCRtpCodecParameters] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    return codecs


def receiver_rtx_ssrcs(receiver: RTCRtpReceiver) -> dict[int, int]:
    """RTX SSRC → media SSRC, as signalled in the remote SDP."""
    rtx: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    return rtx


async def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Ask the publisher behind ``receiver`` for a keyframe (RTCP PLI)."""
    await receiver._send_rtcp_pli(media_ssrc)


async def send_nack(receiver: RTCRtpReceiver, media_ssrc: int, lost: list[int]) -> None:
    """Ask the publisher behind ``receiver`` to retransmit ``lost`` sequence numbers of ``media_ssrc`` (NACK)."""
    await receiver._send_rtcp_nack(media_ssrc, lost)


def receiver_rtcp_ssrc(receiver: RTCRtpReceiver) -> int | None:
    """The SSRC the receiver's RTCP feedback is sent from (set once the receiver started)."""
    ssrc: int | None = receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
    return ssrc


def receiver_streams(receiver: RTCRtpReceiver) -> dict[int, StreamStatistics]:
    """SSRC → receive statistics, from which aiortc builds the receiver's RTCP receiver reports. A handler that
    replaces aiortc's (:func:`hook_receiver_rtp`) without calling it adds packets here to keep the reports."""
    streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    return streams


# --- sender (subscriber side) -----------------------------------------------------------------------


def hook_sender_rtcp(sender: RTCRtpSender, handler: RtcpHandler) -> RtcpHandler:
    """Route RTCP addressed to ``sender`` through ``handler``; returns the original handler."""
    original: RtcpHandler = sender._handle_rtcp_packet
    sender._handle_rtcp_packet = handler  # type: ignore[method-assign,assignment]
    return original


def unhook_sender_rtcp(sender: RTCRtpSender) -> None:
    """Undo :func:`hook_sender_rtcp`."""
    sender.__dict__.pop("_handle_rtcp_packet", None)


def sender_started(sender: RTCRtpSender) -> bool:
    """True once negotiation completed and aiortc started the sender on a connected transport."""
    return bool(sender._RTCRtpSender__started)  # type: ignore[attr-defined]


def sender_header_extensions(sender: RTCRtpSender) -> HeaderExtensionsMap:
    """The header extension IDs negotiated for the sender's m-section."""
    ext_map: HeaderExtensionsMap = sender._RTCRtpSender__rtp_header_extensions_map  # type: ignore[attr-defined]
    return ext_map


def header_extension_ids(ext_map: HeaderExtensionsMap) -> tuple[int | None, int | None, int | None]:
    """The negotiated one-byte header extension IDs: (mid, abs-send-time, audio-level), ``None`` if absent."""
    ids = ext_map._HeaderExtensionsMap__ids  # type: ignore[attr-defined]
    return ids.mid or None, ids.abs_send_time or None, ids.audio_level or None


def sender_mid(sender: RTCRtpSender) -> str | None:
    mid: str | None = sender._RTCRtpSender__mid  # type: ignore[attr-defined]
    return mid


def sender_count_sent(sender: RTCRtpSender, payload_bytes: int, rtp_timestamp: int, ntp_time: int) -> None:
    """Account one sent packet so the sender's RTCP sender reports stay true."""
    sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]
    sender._RTCRtpSender__octet_count += payload_bytes  # type: ignore[attr-defined]
    sender._RTCRtpSender__rtp_timestamp = rtp_timestamp  # type: ignore[attr-defined]
    sender._RTCRtpSender__ntp_timestamp = ntp_time  # type: ignore[attr-defined]


def sender_ssrc(sender: RTCRtpSender) -> int:
    """The SSRC the sender was given (what subscribers' RTCP refers to)."""
    return sender._ssrc


def take_keyframe_request(sender: RTCRtpSender) -> bool:
    """Whether the remote side asked ``sender`` for a keyframe since the last call (PLI/FIR), resetting the flag.
    For senders whose track produces pre-encoded frames."""
    wanted = bool(getattr(sender, "_RTCRtpSender__force_keyframe", False))
    if wanted:
        sender._RTCRtpSender__force_keyframe = False  # type: ignore[attr-defined]
    return wanted


def set_sender_stream(sender: RTCRtpSender, stream_id: str, track_id: str) -> None:
    """Set the ``a=msid:<stream> <track>`` a sender is offered with."""
    sender._stream_id = stream_id
    sender._track_id = track_id


def transceiver_codecs(transceiver: RTCRtpTransceiver) -> list[RTCRtpCodecParameters]:
    """The codecs negotiated for a transceiver, preferred first (the first one is what is sent)."""
    codecs: list[RTCRtpCodecParameters] = transceiver._codecs
    return codecs


def prefer_codec(transceiver: RTCRtpTransceiver, mime_type: str) -> bool:
    """
    Put the negotiated codecs of ``mime_type`` (and their RTX) first on a transceiver whose remote offer was just
    applied, so the answer lists them first and the offerer sends that codec (JSEP: the first codec of the answer
    that both support). The codecs themselves are untouched. Whether the offer had such a codec.
    """
    codecs: list[RTCRtpCodecParameters] = transceiver._codecs
    chosen = [c for c in codecs if c.mimeType.lower() == mime_type.lower()]
    if not chosen:
        return False
    payload_types = {c.payloadType for c in chosen}
    rtx = [c for c in codecs if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") in payload_types]
    transceiver._codecs = chosen + rtx + [c for c in codecs if c not in chosen and c not in rtx]
    return True


def add_header_extensions(transceiver: RTCRtpTransceiver, extensions: dict[str, int]) -> None:
    """
    Negotiate more header extensions on ``transceiver`` (``uri`` → ``id``), as if aiortc supported them: they are
    written in the next answer or offer, and parsed into ``packet.extensions`` once the transceiver starts. Call
    between ``setRemoteDescription`` and ``createAnswer`` (or before ``createOffer``). Present URIs are kept.
    """
    present = {ext.uri for ext in transceiver._headerExtensions}
    for uri, ext_id in extensions.items():
        if uri not in present:
            transceiver._headerExtensions.append(RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri))


def set_rtcp_feedback(transceiver: RTCRtpTransceiver, *, add: str | None = None, remove: str | None = None) -> None:
    """Add or remove an ``a=rtcp-fb`` type (e.g. ``transport-cc``, ``goog-remb``) on every negotiated codec of
    ``transceiver`` but RTX; call at the same point as :func:`add_header_extensions`."""
    for codec in transceiver._codecs:
        if codec.mimeType.lower().endswith("/rtx"):
            continue
        feedback = [fb for fb in codec.rtcpFeedback if fb.type != remove]
        if add is not None and not any(fb.type == add for fb in feedback):
            feedback.append(RTCRtcpFeedback(type=add))
        codec.rtcpFeedback = feedback


# --- a connection's datagrams (transport-cc, simulcast routing) ------------------------------------------------

RtpDataHandler = Callable[[bytes, int], Awaitable[None]]
RtcpDataHandler = Callable[[bytes], Awaitable[None]]


def hook_transport_rtp(dtls: RTCDtlsTransport, handler: RtpDataHandler) -> RtpDataHandler:
    """Route every decrypted RTP datagram of ``dtls`` (``data, arrival_time_ms``) through ``handler``; returns
    aiortc's own handler (parse, route to a receiver), for what ``handler`` does not take."""
    original: RtpDataHandler = dtls._handle_rtp_data
    dtls._handle_rtp_data = handler  # type: ignore[method-assign,assignment]
    return original


def hook_transport_rtcp(dtls: RTCDtlsTransport, handler: RtcpDataHandler) -> RtcpDataHandler:
    """Route every decrypted RTCP datagram of ``dtls`` through ``handler``; returns aiortc's own handler."""
    original: RtcpDataHandler = dtls._handle_rtcp_data
    dtls._handle_rtcp_data = handler  # type: ignore[method-assign,assignment]
    return original


def unhook_transport(dtls: RTCDtlsTransport) -> None:
    """Undo :func:`hook_transport_rtp` and :func:`hook_transport_rtcp`."""
    dtls.__dict__.pop("_handle_rtp_data", None)
    dtls.__dict__.pop("_handle_rtcp_data", None)


def parse_rtp(dtls: RTCDtlsTransport, data: bytes) -> RtpPacket:
    """Parse an RTP datagram with the connection's negotiated header extension IDs.

    :raises ValueError: not a valid RTP packet."""
    return RtpPacket.parse(data, dtls._rtp_header_extensions_map)


def route_rtp(dtls: RTCDtlsTransport, packet: RtpPacket) -> RTCRtpReceiver | None:
    """The receiver aiortc would hand ``packet`` to (by SSRC, else by a payload type unique to one receiver)."""
    receiver = dtls._rtp_router.route_rtp(packet)
    return receiver if isinstance(receiver, RTCRtpReceiver) else None


def register_ssrc(dtls: RTCDtlsTransport, ssrc: int, receiver: RTCRtpReceiver) -> None:
    """Tell aiortc's router that ``ssrc`` belongs to ``receiver`` (so that its sender reports reach it)."""
    dtls._rtp_router.ssrc_table[ssrc] = receiver


def register_sender_ssrc(sender: RTCRtpSender, ssrc: int) -> None:
    """Route RTCP about ``ssrc`` (receiver reports, PLI, FIR, NACK) to ``sender``: for streams its owner sends
    itself on the sender's transport, e.g. the simulcast layers of the benchmark's publisher. See them with
    :func:`hook_sender_rtcp`."""
    sender.transport._rtp_router.senders[ssrc] = sender


async def send_rtcp(dtls: RTCDtlsTransport, data: bytes) -> None:
    """SRTCP-protect and send serialized RTCP on a connection.

    :raises ConnectionError: the connection is not (or no longer) connected."""
    await dtls._send_rtp(data)


def offerable_codec(codec: RTCRtpCodecParameters) -> RTCRtpCodecCapability:
    """
    The capability to put in a transceiver's codec preferences for a source in ``codec`` (the same format, see
    :func:`.rtp.same_codec`). aiortc lists H.264 only as baseline and constrained baseline; for another profile
    WebRTC knows (Main, High, ...) one entry, with the source's ``profile-level-id``, is added to aiortc's codec
    table (with its RTX), once per profile and packetization mode: a process-wide, append-only change.

    :raises UnsupportedCodecError: no such capability, and none can be added (an unknown H.264 profile, or
        another codec aiortc does not support).
    """
    kind = codec.mimeType.split("/", 1)[0].lower()
    for capability in RTCRtpSender.getCapabilities(kind).codecs:
        if same_codec(capability, codec):
            return capability
    if codec.mimeType.lower() != "video/h264" or h264_profile(codec) is None:
        raise UnsupportedCodecError(f"{codec.mimeType} {dict(codec.parameters)} cannot be offered")
    table: list[RTCRtpCodecParameters] = aiortc.codecs.CODECS["video"]
    payload_type = max(c.payloadType or 0 for c in table) + 1
    if payload_type + 1 > 127:
        raise UnsupportedCodecError("no dynamic payload type left for another H.264 profile")
    template = next(c for c in table if c.mimeType.lower() == "video/h264")
    parameters: dict[str, str | int | None] = {
        "level-asymmetry-allowed": "1",
        "packetization-mode": str(codec.parameters.get("packetization-mode", "1")),
        "profile-level-id": str(codec.parameters["profile-level-id"]).lower(),
    }
    table += [
        RTCRtpCodecParameters(mimeType=template.mimeType, clockRate=template.clockRate, payloadType=payload_type,
                              rtcpFeedback=list(template.rtcpFeedback), parameters=parameters),
        RTCRtpCodecParameters(mimeType="video/rtx", clockRate=template.clockRate, payloadType=payload_type + 1,
                              parameters={"apt": payload_type}),
    ]
    return next(c for c in RTCRtpSender.getCapabilities(kind).codecs if same_codec(c, codec))


def direct_rtp_sender(sender: RTCRtpSender) -> Callable[[bytes], None] | None:
    """
    A synchronous way to send the sender's RTP: SRTP-protect, then write straight to the UDP socket of the
    nominated ICE pair. aiortc's own path goes through six coroutines per packet (DTLS transport, ICE
    transport, aioice connection, protocol) that never actually wait; this is the same work without them.

    Available once ICE and DTLS are connected, and only for a pair on a plain UDP socket (host or
    peer-reflexive); ``None`` otherwise (e.g. a TURN-relayed pair): then use :func:`send_rtp`. The function
    raises ``ConnectionError`` once the transport is no longer connected or the nominated pair changed.
    """
    dtls = sender.transport
    connection = dtls.transport._connection
    pair = connection._nominated.get(1)
    if dtls._state is not DtlsState.CONNECTED or pair is None or type(pair.protocol) is not aioice.ice.StunProtocol:
        return None
    udp = pair.protocol.transport
    address = pair.remote_addr
    protect = dtls._tx_srtp.protect
    nominated = connection._nominated

    def send(data: bytes) -> None:
        if dtls._state is not DtlsState.CONNECTED or nominated.get(1) is not pair or udp.is_closing():
            raise ConnectionError("the transport is no longer connected")
        udp.sendto(protect(data), address)

    return send


async def send_rtp(sender: RTCRtpSender, data: bytes) -> None:
    """SRTP-protect and send one serialized RTP packet on the sender's transport."""
    await sender.transport._send_rtp(data)


def nominated_local_candidate_type(dtls: RTCDtlsTransport) -> str | None:
    """The type (``host``, ``srflx``, ``prflx``, ``relay``) of the local candidate of the nominated ICE pair."""
    pair = dtls.transport._connection._nominated.get(1)
    return None if pair is None else str(pair.local_candidate.type)


# --- datagrams (benchmark receive fast path) ----------------------------------------------------------------

DatagramHandler = Callable[[bytes, tuple[Any, ...]], bool]


def ice_protocols(dtls: RTCDtlsTransport) -> list[Any]:
    """The aioice datagram protocols (one per local candidate socket) under a DTLS transport."""
    return list(dtls.transport._connection._protocols)


def intercept_datagrams(protocol: Any, handler: DatagramHandler) -> None:
    """Show every datagram ``protocol`` receives to ``handler`` first; aioice handles it unless ``handler``
    returns true."""
    original = protocol.datagram_received

    def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        if not handler(data, addr):
            original(data, addr)

    protocol.datagram_received = datagram_received


#: ``SO_TIMESTAMPNS`` (and its control message type) on Linux: the kernel's receive time of each datagram.
_SO_TIMESTAMPNS = 35


def kernel_arrival_times(dtls: RTCDtlsTransport, on_arrival: Callable[[bytes, int], None]) -> bool:
    """
    Read the UDP sockets under ``dtls`` with their kernel receive timestamps, and call
    ``on_arrival(datagram, nanoseconds)`` for each datagram (still encrypted: RTP headers and header extensions
    are in the clear) before aioice and aiortc handle it as usual. The time is the kernel's wall clock; only
    differences between datagrams matter. Returns whether every socket could be read this way (Linux, plain UDP;
    a TURN-relayed or TCP connection cannot).
    """
    import socket
    import struct

    loop = asyncio.get_running_loop()
    protocols = ice_protocols(dtls)
    done = 0
    for protocol in protocols:
        transport = getattr(protocol, "transport", None)
        sock = getattr(transport, "_sock", None)
        if transport is None or sock is None or sock.type != socket.SOCK_DGRAM or transport.is_closing():
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            continue
        fd = sock.fileno()

        def read_ready(sock: Any = sock, transport: Any = transport, protocol: Any = protocol) -> None:
            if transport.is_closing():
                return
            try:
                data, ancillary, _, addr = sock.recvmsg(65536, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= 16:
                    seconds, nanoseconds = struct.unpack("qq", value[:16])
                    on_arrival(data, seconds * 1_000_000_000 + nanoseconds)
            protocol.datagram_received(data, addr)

        # The transport owns the descriptor, so the loop's public add_reader refuses it: swap its reader.
        loop._remove_reader(fd)  # type: ignore[attr-defined]
        loop._add_reader(fd, read_ready)  # type: ignore[attr-defined]
        done += 1
    return bool(protocols) and done == len(protocols)


def srtp_unprotect(dtls: RTCDtlsTransport) -> Callable[[bytes], bytes] | None:
    """The SRTP decryption of an established DTLS transport (``None`` before the handshake completed)."""
    srtp = dtls._rx_srtp
    unprotect: Callable[[bytes], bytes] | None = None if srtp is None else srtp.unprotect
    return unprotect


# --- encoders ---------------------------------------------------------------------------------------------------


def opus_encoder(bitrate: int) -> OpusEncoder:
    """aiortc's Opus encoder, at ``bitrate`` bits per second."""
    encoder = OpusEncoder()
    encoder.codec.bit_rate = bitrate
    return encoder


# --- hardening ----------------------------------------------------------------------------------------

_stun_guard_installed = False


def guard_stun_parsing(log_every: float = 10.0) -> None:
    """
    Keep hostile datagrams away from aiortc, and from the event loop.

    * aioice hands every datagram that is not STUN to the DTLS/SRTP layer, from *any* source address, and
      aiortc's DTLS loop dies on an empty one (``IndexError`` on ``data[0]``), closing the whole
      connection: one empty UDP packet could end someone's call. Empty datagrams are dropped, and so is
      non-STUN data from an address that is not the remote side of one of the connection's candidate pairs
      (a pair exists once a connectivity check has been seen from or sent to that address).
    * aioice's STUN parser raises ``struct.error``/``IndexError`` (not only ``ValueError``) on some
      truncated attributes, which would escape into the event loop with a traceback per datagram.

    Dropped datagrams are counted and logged at most once per ``log_every`` seconds.
    """
    global _stun_guard_installed
    if _stun_guard_installed:
        return
    import logging
    import time

    log = logging.getLogger("chorus.sfu.ice")
    original = aioice.ice.StunProtocol.datagram_received
    state = {"dropped": 0, "last_log": 0.0}

    def drop(reason: str, addr: tuple[Any, ...]) -> None:
        state["dropped"] += 1
        now = time.monotonic()
        if now - state["last_log"] >= log_every:
            log.warning("dropped unusable datagrams", extra={"chorus": {
                "count": state["dropped"], "last_reason": reason, "from": addr[0]}})
            state["last_log"] = now
            state["dropped"] = 0

    def known_remote(protocol: Any, addr: tuple[str, int]) -> bool:
        allowed: set[tuple[str, int]] | None = protocol.__dict__.get("_chorus_remotes")
        if allowed is not None and addr in allowed:
            return True
        pairs = getattr(protocol.receiver, "_check_list", ())  # refresh on a miss only
        allowed = {p.remote_addr for p in pairs if p.protocol is protocol}
        protocol._chorus_remotes = allowed
        return addr in allowed

    def datagram_received(self: Any, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if not data:
            drop("empty", addr)
            return
        # STUN messages start with two zero bits; anything else is media/DTLS and must come from a peer.
        if data[0] > 3 and not known_remote(self, (addr[0], addr[1])):  # type: ignore[operator]
            drop("unknown source", addr)
            return
        try:
            original(self, data, addr)
        except Exception as exc:  # noqa: BLE001 - any parser failure means "not a datagram we can use"
            drop(type(exc).__name__, addr)

    aioice.ice.StunProtocol.datagram_received = datagram_received  # type: ignore[method-assign]
    _stun_guard_installed = True
