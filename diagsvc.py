#!/usr/bin/env python3
"""diagsvc: the classic Internet diagnostic services in one file.

Serves, over TCP and UDP, IPv4 and IPv6, from a single ``selectors`` event
loop on non-blocking sockets:

    service   port  RFC   TCP                              UDP (one reply a datagram)
    echo         7  862   every byte back, until EOF       the same payload back
    discard      9  863   reads and drops, never sends     no reply
    daytime     13  867   one ctime() line, then closes    one line
    qotd        17  865   one quote, then closes           one quote
    chargen     19  864   the 72-column ring, forever      0-512 ring characters
    time        37  868   4 bytes, then closes             4 bytes

Run it (standard library only, CPython 3.6 to 3.13, any OS):

    python3 diagsvc.py                      # all services, standard ports (root)
    python3 diagsvc.py --port-offset 10000  # 10007, 10009, ... without root
    python3 diagsvc.py echo chargen --tcp   # a subset
    python3 diagsvc.py --for 2h             # a window: then it closes all
    python3 diagsvc.py probe HOST           # the other end: is the path open?
    python3 diagsvc.py measure HOST         # the other end: how fast?
    python3 diagsvc.py measure HOST udp loaded mtu   # loss, bufferbloat, MTU

Import it, for example to get an echo server inside a test suite:

    import diagsvc
    with diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None) as server:
        server.start()                      # background thread, sockets bound
        host, port = server.addresses["echo", "tcp"][0]

Safety: the server is meant to be left running on exposed hosts.  Every TCP
connection costs bounded memory (at most ``max_output`` bytes owed to it) and
is closed after ``idle_timeout`` seconds with no byte moving; connections are
limited in total and per source address; UDP replies are never sent to
ports below 1024 or to broadcast or multicast addresses (the echo-chargen loop,
CVE-1999-0103), nor, past a few, to datagrams that repeat a reply just sent
to their peer (a loop on any ports), and are rate-limited per source for
the services whose reply can be larger than the request; ``allow``/``deny``
lists filter both transports; started as root, the command line drops to
``nobody`` once every socket is bound.  The README lists each default and the reason for it.

Under systemd it needs no root at all: it serves the sockets it is passed
(socket activation, LISTEN_FDS) and reports readiness, status and watchdog
to NOTIFY_SOCKET; the README has the unit files.

This file is self-contained and may be copied into a project as it is,
under the MIT licence: Copyright (c) 2026 The diagsvc authors; permission is
granted, free of charge, to deal in it without restriction, provided this
notice is kept; it is provided "as is", without warranty of any kind (the
full text is in the project's LICENSE file).
"""

__version__ = "1.0.0"
__all__ = [
    "SERVICES", "Server", "ServerError", "QuoteFileError", "SystemdNotifier",
    "parse_duration",
    "chargen_line", "chargen_stream", "daytime_text", "time_bytes",
    "parse_quotes", "load_quotes", "probe", "measure", "main",
    "stream_datagram", "parse_stream_datagram",
]

import collections
import errno
import os
import selectors
import socket
import struct
import sys
import threading                    # the log writer (and Server.start)
import time
import weakref
from binascii import crc32

# --- Compatibility: computed once, by feature detection ---------------------


def _selector_classes():
    """Selector classes that work here, best first.

    DefaultSelector is the platform's best (epoll, kqueue, devpoll); poll and
    select are the fallbacks for a kernel or sandbox where it cannot be
    created (an epoll-less container, say).
    """
    found = []
    for name in ("DefaultSelector", "PollSelector", "SelectSelector"):
        cls = getattr(selectors, name, None)
        if cls is None or cls in found:
            continue
        try:
            cls().close()
        except (OSError, ValueError):
            continue
        found.append(cls)
    return found


SELECTORS = _selector_classes()

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

_ON_LINUX = sys.platform.startswith("linux")
_ON_WINDOWS = sys.platform == "win32"

# Answering a UDP datagram from the address it was sent to needs recvmsg and
# sendmsg with IP_PKTINFO / IPV6_PKTINFO.  Python before 3.9 lacks the
# IP_PKTINFO constant even where the kernel has it: use Linux's number there.
_HAS_MSG = hasattr(socket.socket, "recvmsg") and hasattr(socket.socket, "sendmsg")
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8 if _ON_LINUX else None)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49 if _ON_LINUX else None)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50 if _ON_LINUX else None)
_PKTINFO_ANCILLARY_SIZE = socket.CMSG_SPACE(20) if _HAS_MSG else 0

# Sending without a mode switch on a socket that accept() made blocking.
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# Linux: hold the data for the FIN that follows, so that a one-shot reply
# and its FIN leave in one segment (see Server._answer_once).
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
# The C class under socket.socket (_socket.socket): accepted connections
# are made of it (see Listener._accept).
_CONNECTION_SOCKET = socket.socket.__mro__[1]

try:
    import resource
except ImportError:         # Windows
    resource = None


def _ipv6_available():
    if not socket.has_ipv6:
        return False
    try:
        probe_socket = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return False
    try:
        probe_socket.bind(("::1", 0))
    except OSError:
        return False
    finally:
        probe_socket.close()
    return True


# accept() errors that mean "out of descriptors or memory": pause accepting.
_RESOURCE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
    if hasattr(errno, name))


# --- Pure content: no I/O, easy to test byte for byte -----------------------

# RFC 864: the 95 printable ASCII characters, 72 to a line, each line starting
# one character further along the ring; 95 lines make one full period.
CHARGEN_RING = bytes(range(32, 127))
CHARGEN_LINE_LENGTH = 72
CHARGEN_LINE_COUNT = len(CHARGEN_RING)


def chargen_line(number):
    """Line ``number`` (1-based) of the RFC 864 stream, CRLF included."""
    start = (number - 1) % CHARGEN_LINE_COUNT
    doubled = CHARGEN_RING + CHARGEN_RING
    return doubled[start:start + CHARGEN_LINE_LENGTH] + b"\r\n"


def chargen_stream(size, first_line=1):
    """The first ``size`` bytes of the stream that starts at ``first_line``."""
    period = b"".join(chargen_line(first_line + i)
                      for i in range(CHARGEN_LINE_COUNT))
    copies = size // len(period) + 1
    return (period * copies)[:size]


CHARGEN_PERIOD = chargen_stream(CHARGEN_LINE_COUNT * (CHARGEN_LINE_LENGTH + 2))
CHARGEN_PERIOD_SIZE = len(CHARGEN_PERIOD)           # 7030 bytes
CHARGEN_LINE_SIZE = CHARGEN_LINE_LENGTH + 2         # 74 bytes
# One send hands the kernel up to this much; the precomputed buffer holds a
# whole chunk after any offset in the period, so every send is one slice.
CHARGEN_CHUNK = 256 * 1024
_CHARGEN_BUFFER = CHARGEN_PERIOD * (CHARGEN_CHUNK // CHARGEN_PERIOD_SIZE + 2)
CHARGEN_VIEW = memoryview(_CHARGEN_BUFFER)
UDP_CHARGEN_MAX = 512                               # RFC 864: 0 to 512

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
                "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def daytime_text(now=None):
    """RFC 867 daytime in the BSD inetd form, ctime(3) in local time.

    ``Mon Jan 19 17:43:18 2009\\r\\n``: English names whatever the locale,
    as inetd's daytime_stream sends ctime() output.
    """
    t = time.localtime(time.time() if now is None else now)
    return ("%s %s %2d %02d:%02d:%02d %d\r\n" % (
        _DAY_NAMES[t.tm_wday], _MONTH_NAMES[t.tm_mon - 1], t.tm_mday,
        t.tm_hour, t.tm_min, t.tm_sec, t.tm_year)).encode("ascii")


# RFC 868: seconds since 1900-01-01 00:00 UTC.  Taken modulo 2**32, which is
# what keeps it working past 2036-02-07 (the era wraps; clients that know the
# approximate date, as RFC 868 clients do, resolve it).
TIME_EPOCH_OFFSET = 2208988800


def time_bytes(now=None):
    """RFC 868 time: 4 bytes, big-endian, seconds since 1900 modulo 2**32."""
    seconds = int(time.time() if now is None else now) + TIME_EPOCH_OFFSET
    return struct.pack("!I", seconds % (1 << 32))


# RFC 865: a quote should be limited to the ASCII printing characters, space,
# CR and LF, and be under 512 characters.
QOTD_MAX = 511

BUILTIN_QUOTES = (
    "Be conservative in what you do, be liberal in what you accept from "
    "others.\n    -- Jon Postel, RFC 793",
    "No matter how hard you push and no matter what the priority, you can't "
    "increase the speed of light.\n    -- RFC 1925, The Twelve Networking "
    "Truths",
    "With sufficient thrust, pigs fly just fine.\n    -- RFC 1925, The "
    "Twelve Networking Truths",
    "It is more complicated than you think.\n    -- RFC 1925, The Twelve "
    "Networking Truths",
    "It is always possible to add another level of indirection.\n    -- "
    "RFC 1925, The Twelve Networking Truths",
    "We reject kings, presidents and voting. We believe in rough consensus "
    "and running code.\n    -- David D. Clark, IETF, 1992",
    "A distributed system is one in which the failure of a computer you "
    "didn't even know existed can render your own computer unusable.\n    "
    "-- Leslie Lamport",
)


class QuoteFileError(ValueError):
    """A quote file that RFC 865 does not allow; the message names the line."""


def parse_quotes(text, name="<quotes>"):
    """Quotes in ``fortune`` format (separated by lines holding only ``%``).

    Returns a tuple of quotes as bytes with CRLF line ends.  Tabs are
    expanded to spaces (fortune files use them; RFC 865 allows only
    printing characters).  Raises QuoteFileError naming the first line
    that breaks RFC 865, or the quote that is too long.
    """
    quotes = []
    lines = []
    first_line = 1
    # Lines end at LF (or CRLF) only: str.splitlines() would also end them
    # at form feeds and \x1c-\x1e, and rstrip() would drop those, so a
    # control character would be passed over instead of refused.
    for number, line in enumerate(text.split("\n") + ["%"], 1):
        if line.endswith("\r"):
            line = line[:-1]
        if line.strip(" \t") == "%":
            body = "\r\n".join(lines).rstrip() + "\r\n" if lines else ""
            if body.strip():
                if len(body) > QOTD_MAX:
                    raise QuoteFileError(
                        "%s: the quote at lines %d-%d is %d characters; "
                        "RFC 865 wants fewer than 512" % (
                            name, first_line, number - 1, len(body)))
                quotes.append(body.encode("ascii"))
            lines = []
            first_line = number + 1
            continue
        line = line.expandtabs(8).rstrip(" ")
        for character in line:
            if not " " <= character <= "~":
                raise QuoteFileError(
                    "%s: line %d holds %r, which is not printable ASCII "
                    "(RFC 865)" % (name, number, character))
        lines.append(line)
    if not quotes:
        raise QuoteFileError("%s: no quotes found (fortune format: quotes "
                             "separated by lines holding only %%)" % name)
    return tuple(quotes)


def checked_quotes(quotes):
    """Quotes given as bytes (Server(quotes=...)), held to the rules that
    parse_quotes() applies to a file (RFC 865: printable ASCII, space,
    CR and LF, fewer than 512 characters); a tuple, or QuoteFileError."""
    checked = []
    for number, quote in enumerate(quotes, 1):
        if isinstance(quote, str):
            try:
                quote = quote.encode("ascii")
            except UnicodeEncodeError:
                raise QuoteFileError("quotes: quote %d is not ASCII "
                                     "(RFC 865)" % number)
        if not isinstance(quote, bytes) or not quote.strip():
            raise QuoteFileError("quotes: quote %d is not a non-empty byte "
                                 "string" % number)
        if len(quote) > QOTD_MAX:
            raise QuoteFileError("quotes: quote %d is %d characters; RFC 865 "
                                 "wants fewer than 512" % (number, len(quote)))
        for byte in bytearray(quote):
            if not (32 <= byte <= 126 or byte in (13, 10)):
                raise QuoteFileError(
                    "quotes: quote %d holds byte %d, which is not printable "
                    "ASCII, CR or LF (RFC 865)" % (number, byte))
        checked.append(quote)
    return tuple(checked)


def load_quotes(path):
    """Quotes from a fortune-format file; QuoteFileError says what is wrong."""
    try:
        with open(path, "rb") as quote_file:
            raw = quote_file.read()
    except OSError as error:
        raise QuoteFileError("cannot read quote file %s: %s" % (
            path, error.strerror or error))
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as error:
        number = raw.count(b"\n", 0, error.start) + 1
        raise QuoteFileError(
            "%s: line %d holds byte 0x%02x, which is not printable ASCII "
            "(RFC 865)" % (path, number, raw[error.start]))
    return parse_quotes(text, path)


def _random_below(limit):
    """A random integer in [0, limit); os.urandom avoids importing random."""
    return int.from_bytes(os.urandom(4), "big") % limit


# --- The services ------------------------------------------------------------
#
# Each service says, in one class, what it does with a UDP datagram and on a
# TCP connection.  One-shot services (daytime, qotd, time) answer on accept
# and half-close; the connection then waits in the loop (OneShotStream) only
# for the client's close.  Streaming services (echo, discard, chargen) name
# a Stream subclass that does the work.


class Stream(object):
    """One TCP connection in the event loop.

    The server owns it; the subclass's on_event() is called with the ready
    events.  No buffer is held unless output is owed: ``owed`` is None or a
    memoryview of what the socket has not taken yet.
    """

    __slots__ = ("server", "sock", "source", "counters", "events",
                 "last_active", "owed")

    initial_events = EVENT_READ

    def __init__(self, server, sock, source, counters):
        self.server = server
        self.sock = sock
        self.source = source
        self.counters = counters
        self.events = self.initial_events
        self.last_active = server.now
        self.owed = None

    def set_events(self, events):
        if events != self.events:
            self.events = events
            self.server.selector.modify(self.sock, events, self)

    def send_owed(self):
        """Send what is owed; True once nothing is."""
        try:
            sent = self.sock.send(self.owed)
        except BlockingIOError:
            return False
        self.counters.bytes_out += sent
        self.last_active = self.server.now
        if sent == len(self.owed):
            self.owed = None
            return True
        self.owed = self.owed[sent:]
        return False

    def close(self):
        self.server.close_stream(self)


class EchoStream(Stream):
    """RFC 862 over TCP: every byte back, in order, until EOF.

    Reads into the server's shared buffer and sends at once; only what the
    socket did not take is kept, and while anything is owed the client is
    not read, so a client that never reads costs at most max_output bytes.
    """

    __slots__ = ()

    def on_event(self, events):
        if self.owed is not None:
            if self.send_owed():
                self.set_events(EVENT_READ)
            return
        server = self.server
        buffer = server.stream_buffer
        count = self.sock.recv_into(buffer, server.echo_read_size)
        if not count:
            # EOF: nothing is owed (we read only when nothing is), so the
            # whole echo has been sent: close.
            self.close()
            return
        self.counters.bytes_in += count
        self.last_active = server.now
        try:
            sent = self.sock.send(buffer[:count])
        except BlockingIOError:
            sent = 0
        self.counters.bytes_out += sent
        if sent < count:
            self.owed = memoryview(bytes(buffer[sent:count]))
            self.set_events(EVENT_WRITE)


class DiscardStream(Stream):
    """RFC 863 over TCP: read and drop until EOF; never send."""

    __slots__ = ()

    def on_event(self, events):
        count = self.sock.recv_into(self.server.stream_buffer)
        if not count:
            self.close()
            return
        self.counters.bytes_in += count
        self.last_active = self.server.now


# sendfile() refused for this file or socket: fall back to send().
_NO_SENDFILE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EINVAL", "ENOSYS", "ENOTSOCK",
                                      "EOPNOTSUPP", "ENOTSUP")
    if hasattr(errno, name))


def chargen_ring_file():
    """The precomputed ring in an in-memory file, for os.sendfile().

    The kernel then sends the ring's pages without copying them from the
    process (about a third more chargen throughput on Linux loopback than
    send() of the same slices).  None where os.sendfile() does not exist
    (Windows): the memoryview send() path is used there.
    """
    if not hasattr(os, "sendfile"):
        return None
    try:
        if hasattr(os, "memfd_create"):         # Linux, Python 3.8+
            descriptor = os.memfd_create("diagsvc-chargen")
        else:
            import tempfile
            with tempfile.TemporaryFile() as ring_file:
                descriptor = os.dup(ring_file.fileno())
    except OSError:
        return None
    try:
        written = 0
        while written < len(_CHARGEN_BUFFER):
            written += os.write(descriptor, CHARGEN_VIEW[written:])
    except OSError:                             # a full /tmp, say
        os.close(descriptor)
        return None
    return descriptor


class ChargenStream(Stream):
    """RFC 864 over TCP: the ring, from line 1, until the client closes.

    Sends the precomputed ring (from chargen_ring_file() with sendfile, or
    as memoryview slices): per connection only an offset.
    Input is read and thrown away.  A client's half-close does not stop the
    stream (RFC 864: until the user terminates the connection; inetd's
    chargen_stream does not read at all): reading simply stops.
    """

    __slots__ = ("offset",)

    initial_events = EVENT_READ | EVENT_WRITE

    def __init__(self, server, sock, source, counters):
        Stream.__init__(self, server, sock, source, counters)
        self.offset = 0

    def on_event(self, events):
        if events & EVENT_READ:
            count = self.sock.recv_into(self.server.stream_buffer)
            if count:
                self.counters.bytes_in += count
                self.last_active = self.server.now
            else:
                self.set_events(EVENT_WRITE)
        if events & EVENT_WRITE:
            offset = self.offset
            ring_file = self.server.chargen_ring_file
            try:
                if ring_file is not None:
                    sent = os.sendfile(self.sock.fileno(), ring_file, offset,
                                       CHARGEN_CHUNK)
                else:
                    sent = self.sock.send(
                        CHARGEN_VIEW[offset:offset + CHARGEN_CHUNK])
            except BlockingIOError:
                return
            except OSError as error:
                if ring_file is None or error.errno not in _NO_SENDFILE_ERRNOS:
                    raise
                self.server.chargen_ring_file = None    # send() from now on
                return
            self.offset = (offset + sent) % CHARGEN_PERIOD_SIZE
            self.counters.bytes_out += sent
            self.last_active = self.server.now


class OneShotStream(Stream):
    """A one-shot reply (daytime, qotd, time) after it was sent: the close.

    Closing a socket with unread input makes the kernel send a reset, and
    some stacks then drop the reply unread (RFC 1122 4.2.2.13; a client such
    as ncat or nmap's daytime.nse sends something first).  So the reply is
    followed by a half-close (FIN), and input is read and dropped until the
    client closes too, for at most ONE_SHOT_LINGER seconds from the reply.
    Until then, any part of the reply that the socket did not take at once
    is ``owed`` and sent first.
    """

    __slots__ = ()

    initial_events = EVENT_READ

    def on_event(self, events):
        if self.owed is not None:
            if self.send_owed():
                self.half_close()
            return
        # The accepted socket may still be blocking (send used
        # MSG_DONTWAIT): never let select()'s spurious readiness block.
        count = self.sock.recv_into(self.server.stream_buffer, 0,
                                    _MSG_DONTWAIT)
        if not count:
            self.close()
            return
        self.counters.bytes_in += count     # input is ignored; the linger
                                            # is not extended by it

    def half_close(self):
        """The reply is all sent: FIN, then wait for the client's close."""
        self.sock.shutdown(socket.SHUT_WR)
        self.last_active = self.server.now
        self.set_events(EVENT_READ)


class Service(object):
    """What one service does.  Subclasses override what applies.

    name, port           the service and its standard port
    stream_class         a Stream subclass for services that keep the
                         connection (echo, discard, chargen), else None
    amplifies            True if a UDP reply can be larger than the request:
                         those replies are rate-limited per source
    tcp_reply(server)    one-shot services: the whole reply
    datagram_reply(server, payload, endpoint)
                         bytes-like to send back, or None for no reply
    """

    name = None
    port = None
    stream_class = None
    amplifies = False

    def tcp_reply(self, server):
        raise NotImplementedError

    def datagram_reply(self, server, payload, endpoint):
        raise NotImplementedError


class Echo(Service):
    name, port, stream_class = "echo", 7, EchoStream

    def datagram_reply(self, server, payload, endpoint):
        return payload


class Discard(Service):
    name, port, stream_class = "discard", 9, DiscardStream

    def datagram_reply(self, server, payload, endpoint):
        return None


class _PerSecond(object):
    """A reply that changes once a second, made once a second."""

    __slots__ = ("make", "second", "value")

    def __init__(self, make):
        self.make = make
        self.second = None
        self.value = None

    def __call__(self):
        second = int(time.time())
        if second != self.second:
            self.value = self.make(second)
            self.second = second
        return self.value


class OneShot(Service):
    """daytime, qotd, time: one reply, the same on TCP (then the server
    closes) and UDP; each can outgrow the request, so it is rate-limited."""

    amplifies = True

    def datagram_reply(self, server, payload, endpoint):
        return self.tcp_reply(server)


class Daytime(OneShot):
    name, port = "daytime", 13
    text = _PerSecond(daytime_text)

    def tcp_reply(self, server):
        return self.text()


class Qotd(OneShot):
    name, port = "qotd", 17

    def tcp_reply(self, server):
        quotes = server.quotes
        return quotes[_random_below(len(quotes))]


class Chargen(Service):
    """UDP: a random number of ring characters, 0 to 512 (RFC 864).

    Each reply starts at the next line of the ring, as BSD inetd's
    chargen_dg turns its ring one step a datagram.
    """

    name, port, stream_class, amplifies = "chargen", 19, ChargenStream, True

    def datagram_reply(self, server, payload, endpoint):
        line = endpoint.chargen_line
        endpoint.chargen_line = (line + 1) % CHARGEN_LINE_COUNT
        start = line * CHARGEN_LINE_SIZE
        return CHARGEN_VIEW[start:start + _random_below(UDP_CHARGEN_MAX + 1)]


class Time(OneShot):
    name, port = "time", 37
    value = _PerSecond(time_bytes)

    def tcp_reply(self, server):
        return self.value()


SERVICES = dict((cls.name, cls()) for cls in (Echo, Discard, Daytime, Qotd,
                                              Chargen, Time))
SERVICE_NAMES = tuple(SERVICES)
STANDARD_PORTS = frozenset(service.port for service in SERVICES.values())
TRANSPORTS = ("tcp", "udp")


# --- The event loop and the server ------------------------------------------

# Defaults; the README's "Safety" section gives the reason for each.
DEFAULT_MAX_PER_SOURCE = 256        # TCP connections from one source
DEFAULT_IDLE_TIMEOUT = 300.0        # seconds with no byte moving
DEFAULT_MAX_OUTPUT = 64 * 1024      # bytes owed to one connection, at most
DEFAULT_UDP_RATE = 10.0             # replies a second per source (amplifiers)
DEFAULT_UDP_BURST = 50              # ... after a burst of this many
DEFAULT_IPV4_PREFIX = 32            # per-source limits count an address...
DEFAULT_IPV6_PREFIX = 64            # ... but an IPv6 /64 (one host's share)
DESCRIPTOR_RESERVE = 64             # stdio, 24 listeners, waker, log, ring
                                    # (32 in all), and as many to spare
# select()'s FD_SETSIZE: on Unix a bound on the descriptor's value (1024 on
# Linux, macOS and the BSDs), on Windows on the number of sockets (512 in
# CPython's build).  The default --max-connections under select() is this
# less DESCRIPTOR_RESERVE; a descriptor past it is refused ("unwatchable").
SELECT_LIMIT = 512 if _ON_WINDOWS else 1024
ONE_SHOT_LINGER = 2.0               # seconds a one-shot waits for the close
PORT_ZERO_ATTEMPTS = 8              # fresh ports tried for one port 0 service
LISTEN_BACKLOG = 4096               # the kernel caps it at its somaxconn
ACCEPT_BATCH = 64                   # accepts per readiness event
DATAGRAM_BATCH = 64                 # datagrams per readiness event
ACCEPT_PAUSE = 0.25                 # seconds without accepting after EMFILE
REFUSAL_LOG_INTERVAL = 60.0         # one log line per source and reason
UDP_LOWEST_SOURCE_PORT = 1024       # below: a service, never a client
LOOP_RETURNS = 16                   # our replies a peer may send back at once,
LOOP_RETURN_INTERVAL = 1.0          # ... then one each this many seconds
LOOP_MEMORY = 1.0                   # a reply is remembered for 1 to 2 s
LOOP_TABLE_MAX = 8192               # replies remembered per generation
RATE_TABLE_MAX = 65536              # sources tracked by the UDP rate limit
SOURCE_CACHE_MAX = 4096             # UDP source decisions remembered
MAX_TIMER_WAIT = 1.0                # the loop wakes at least this often
LOG_BURST = 20                      # log lines a peer can cause at once...
LOG_RATE = 1.0                      # ... then this many a second, in all
LOG_REPORT_INTERVAL = 10.0          # "N log lines suppressed", at most this often
LOG_QUEUE_MAX = 10000               # lines waiting for a slow log, at most
LOG_DRAIN_TIMEOUT = 2.0             # close() waits this long for the log
STREAM_BUFFER_SIZE = 256 * 1024     # shared by every TCP read
LIMIT_MAX = 10 ** 9                 # the largest count, rate or time a limit takes
DATAGRAM_BUFFER_SIZE = 65536        # the largest UDP payload, IPv4 or IPv6
STATUS_INTERVAL = 5.0               # seconds between sd_notify STATUS= lines
# Busy polling (Server(busy_poll=), --busy-poll): the loop may poll, not
# sleep, for a window after its last event; the window adapts between 0
# and busy_poll (see Server._wait_for_events).
DEFAULT_BUSY_POLL = 0.0005          # seconds: the command line's window, at most
BUSY_POLL_START = 0.00005           # the window a sleep that was short opens
BUSY_POLL_FLOOR = 0.00001           # below this, a halved window closes


class ServerError(Exception):
    """A problem the user can fix (a taken port, a missing permission...).

    str() is one line that says what and how to fix it.
    """


class _PortTaken(ServerError):
    """A bind that failed because the port is in use (EADDRINUSE)."""


class Counters(object):
    """What one service did on one transport.  Read them with as_dict()."""

    __slots__ = ("connections", "datagrams", "bytes_in", "bytes_out",
                 "refusals")

    def __init__(self):
        self.connections = 0
        self.datagrams = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.refusals = {}

    def refuse(self, reason):
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def as_dict(self):
        return {"connections": self.connections, "datagrams": self.datagrams,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "refusals": dict(self.refusals)}


def _checked_limit(option, value, highest=LIMIT_MAX, whole=False, lowest=0):
    """value, if it is a number from lowest to highest; else ServerError.

    nan fails every comparison and inf fails the highest, so neither gets
    in; a number past LIMIT_MAX is no limit a host could reach, and a huge
    int would overflow where the loop makes it a float.
    """
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or \
            not lowest <= value <= highest:
        shown = repr(value)
        if len(shown) > 24:
            shown = shown[:20] + "..."
        raise ServerError("--%s must be %s to %s%s, not %s" % (
            option.replace("_", "-"), "{:,}".format(lowest),
            "{:,}".format(highest), " (a whole number)" if whole else "",
            shown))
    return value


def interface_index(scope):
    """An IPv6 scope ("eth0", or already a number) as an interface index."""
    if scope.isdigit():
        return int(scope)
    if not hasattr(socket, "if_nametoindex"):
        raise ServerError("this platform cannot look up interface %r; give "
                          "its index instead (fe80::1%%2)" % (scope,))
    try:
        return socket.if_nametoindex(scope)
    except OSError:
        raise ServerError("no network interface named %r on this host" % (
            scope,))


def interface_name(index):
    """The name of an interface index, or the number where none is known."""
    try:
        return socket.if_indextoname(index)
    except (AttributeError, OSError):
        return str(index)


def scoped_source(address):
    """The source text of an IPv6 sockaddr with a scope: "fe80::1%2".

    Python 3.6 writes the scope into the host ("fe80::1%eth0"), 3.7 and
    later leave it out (bpo-32221): only address[3] is the same on all.
    """
    return "%s%%%d" % (address[0].partition("%")[0], address[3])


class AccessList(object):
    """--allow / --deny: addresses or CIDR networks, IPv4 and IPv6.

    A source is refused if it matches a deny entry, or if there are allow
    entries and it matches none (ncat's --allow/--deny).  An IPv6 entry may
    name a scope (fe80::1%eth0, fe80::/64%eth0 or an index, fe80::1%2): it
    then matches that interface's sources only.  ipaddress cannot do this
    itself: before 3.9 it refuses "%", and from 3.9 on `in` ignores the
    scope.  Decisions are cached per address, so a flood costs a dict
    look-up a packet.
    """

    CACHE_MAX = 4096

    def __init__(self, allow=(), deny=()):
        import ipaddress                # only paid for when lists are given
        self._ip_address = ipaddress.ip_address
        self.allow = [self._rule(ipaddress, entry) for entry in allow]
        self.deny = [self._rule(ipaddress, entry) for entry in deny]
        self._cache = {}

    @staticmethod
    def _rule(ipaddress, entry):
        """(network, interface index or None) from ADDR[/BITS][%SCOPE] or
        ADDR%SCOPE/BITS."""
        text, percent, scope = entry.partition("%")
        if percent and "/" in scope:
            scope, bits = scope.split("/", 1)
            text += "/" + bits
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ServerError(
                "%r is not an IP address or network; give e.g. 192.0.2.7, "
                "192.0.2.0/24, 2001:db8::/32 or fe80::1%%eth0" % (entry,))
        if not percent:
            return network, None
        if network.version != 6 or not scope:
            raise ServerError("%r: only an IPv6 address takes a scope "
                              "(fe80::1%%eth0)" % (entry,))
        # The kernel gives a source its interface only where the address
        # needs one (link-local): a scoped rule for any other address
        # would match nothing, and refuse everything it was meant to allow.
        if not (network.network_address.is_link_local and
                network.prefixlen >= 10):
            raise ServerError("%r: only a link-local address (fe80::/10) "
                              "takes a scope; drop the %%%s" % (entry, scope))
        try:
            index = interface_index(scope)
        except ServerError as error:
            raise ServerError("%r: %s" % (entry, error))
        if scope.isdigit() and hasattr(socket, "if_indextoname"):
            try:
                socket.if_indextoname(index)
            except (OSError, OverflowError, ValueError):
                raise ServerError("%r: no network interface has index %s on "
                                  "this host" % (entry, scope))
        return network, index

    @staticmethod
    def _matches(rules, address, index):
        for network, scope in rules:
            if address in network and (scope is None or scope == index):
                return True
        return False

    def permits(self, host):
        """host: an address, with "%" and its interface for a scoped one."""
        decision = self._cache.get(host)
        if decision is None:
            text, _, scope = host.partition("%")
            address = self._ip_address(text)
            # An IPv4 client of a dual-stack socket (one systemd passed
            # in) is ::ffff:a.b.c.d; the lists name it a.b.c.d.
            address = getattr(address, "ipv4_mapped", None) or address
            index = interface_index(scope) if scope else 0
            decision = not self._matches(self.deny, address, index)
            if decision and self.allow:
                decision = self._matches(self.allow, address, index)
            if len(self._cache) >= self.CACHE_MAX:
                self._cache.clear()
            self._cache[host] = decision
        return decision


_V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"     # ::ffff:0:0/96


def _is_group_address(host):
    """Broadcast or multicast, as text (a datagram's source address)."""
    if host[:7].lower() == "::ffff:" and "." in host:
        host = host[7:]                 # IPv4 on a dual-stack socket
    if ":" in host:
        return host[:2].lower() == "ff"
    first = host.split(".", 1)[0]
    return host == "255.255.255.255" or (first.isdigit() and int(first) >= 224)


_LIMITED_BROADCAST = b"\xff\xff\xff\xff"


def _is_group_destination(packed):
    """Broadcast or multicast, packed (a datagram's destination, pktinfo)."""
    if len(packed) == 16:
        if packed[:12] != _V4_MAPPED_PREFIX:
            return packed[0] == 0xFF
        packed = packed[12:]            # IPv4 on a dual-stack socket
    return packed[0] >= 224 or packed == _LIMITED_BROADCAST


def _needs_interface(packed):
    """An IPv6 address that means something only with its interface:
    link-local (fe80::/10) or multicast (ff00::/8)."""
    return packed[0] == 0xFF or (packed[0] == 0xFE and packed[1] & 0xC0 == 0x80)


def _reply_key(address, payload):
    """Who a datagram came from or went to, and a CRC-32 of all its bytes.

    A loop returns our reply unchanged, so any digest finds it; only one
    of the whole payload keeps two different ones apart wherever they
    differ (a sample of the two ends took 2,000-byte datagrams numbered
    in the middle for one payload).  CRC-32 catches any change within 32
    bits; it costs about 0.3 us a KiB (2.3 us at 8 KiB, 23 us at 64 KiB,
    zlib 1.2.13).  Past 8 KiB a datagram arrives as IP fragments on any
    link but loopback, and a large one is rare.  (DatagramEndpoint.on_event
    has it inline.)
    """
    return hash((address, crc32(payload)))


def source_group(host, ipv4_prefix=DEFAULT_IPV4_PREFIX,
                 ipv6_prefix=DEFAULT_IPV6_PREFIX):
    """The source that per-source limits count: the address's network.

    One IPv6 host commonly holds a whole /64 (SLAAC, privacy addresses,
    RFC 8273), so counting each address alone would give it 2**64 times
    each limit.  IPv4 is counted by address (a /32) by default.  A scope
    ("fe80::1%2") stays on the key: another link is another source.
    """
    address, percent, scope = host.partition("%")
    if address[:7].lower() == "::ffff:" and "." in address:
        host = address = address[7:]    # IPv4 on a dual-stack socket
    if ":" in address:
        family, bits, prefix = socket.AF_INET6, 128, ipv6_prefix
    else:
        family, bits, prefix = socket.AF_INET, 32, ipv4_prefix
    if prefix >= bits:
        return host
    packed = socket.inet_pton(family, address)
    shift = bits - prefix
    number = int.from_bytes(packed, "big") >> shift << shift
    return "%s/%d%s%s" % (
        socket.inet_ntop(family, number.to_bytes(len(packed), "big")),
        prefix, percent, scope)


_UNKNOWN = object()                 # not in a cache yet


def _bound_address(sock):
    """(host, port) of a bound socket; a scoped IPv6 host keeps its
    interface by name ("fe80::1%eth0"), as --bind takes it."""
    sockaddr = sock.getsockname()
    if len(sockaddr) > 3 and sockaddr[3]:
        return ("%s%%%s" % (sockaddr[0].partition("%")[0],
                            interface_name(sockaddr[3])), sockaddr[1])
    return sockaddr[:2]


class Listener(object):
    """A listening TCP socket: accepts in bounded batches."""

    __slots__ = ("server", "sock", "service", "counters", "address",
                 "family")

    def __init__(self, server, sock, service, counters):
        self.server = server
        self.sock = sock
        self.service = service
        self.counters = counters
        self.address = _bound_address(sock)
        self.family = int(sock.family)

    def _accept(self):
        # socket.accept() turns family and type into enums on every call
        # (a tenth of a one-shot connection's cost); _accept() gives the
        # descriptor, and the ints are known.  The connection is the C
        # socket class under socket.socket: the wrapper's __init__ and
        # close() in Python cost about 2 us more a connection, and nothing
        # here uses what it adds (makefile(), enums).  Both exist in
        # 3.6-3.13 and on every platform.
        fd, address = self.sock._accept()
        return _CONNECTION_SOCKET(self.family, socket.SOCK_STREAM, 0,
                                  fd), address

    def on_event(self, events):
        accept = self._accept
        admit = self.server.admit
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in _RESOURCE_ERRNOS:
                    self.server.pause_accepting(error)
                    return
                # ECONNABORTED, EPROTO, ...: that one client's problem.
                continue
            admit(self, sock, address)


class DatagramEndpoint(object):
    """A UDP socket: drains in bounded batches, answers each datagram.

    on_event() is the portable path: one system call a datagram each way.
    answer() decides about one datagram (counters, every guard and limit,
    the loop watch, the reply); Linux's fast path
    (SegmentingDatagramEndpoint, below) calls the same answer() and the
    same send_reply(), so both paths refuse and reply alike.
    """

    __slots__ = ("server", "sock", "service", "counters", "address",
                 "scoped", "pktinfo", "chargen_line", "echoes",
                 "rate_limited", "echo_limited", "watch_loops", "guarded")

    def __init__(self, server, sock, service, counters, pktinfo):
        self.server = server
        self.sock = sock
        self.service = service
        self.counters = counters
        self.address = _bound_address(sock)
        self.scoped = sock.family == socket.AF_INET6
        self.pktinfo = pktinfo          # 0, or 4 / 6: reply from the dst
        self.chargen_line = 0
        self.echoes = service.stream_class is EchoStream
        self.rate_limited = server.udp_rate and service.amplifies
        self.echo_limited = server.udp_echo_rate and self.echoes
        self.guarded = server.udp_guard
        self.watch_loops = (server.udp_guard and
                            service is not SERVICES["discard"])

    def on_event(self, events):
        server = self.server
        sock = self.sock
        buffer = server.datagram_buffer
        pktinfo = self.pktinfo
        answer = self.answer
        verbose = server.verbosity > 1
        for _ in range(DATAGRAM_BATCH):
            try:
                if pktinfo:
                    count, ancillary, _, address = sock.recvmsg_into(
                        [buffer], _PKTINFO_ANCILLARY_SIZE)
                else:
                    count, address = sock.recvfrom_into(buffer)
            except BlockingIOError:
                return
            except ConnectionResetError:
                # Windows reports an earlier reply's ICMP port unreachable
                # on the next receive: go on.
                continue
            reply_info = destination = None
            if pktinfo:
                reply_info, destination = self._reply_from(ancillary)
            reply = answer(buffer[:count], address, destination)
            if reply is None:
                continue
            if not self.send_reply(reply, reply_info, address):
                continue
            if verbose:
                source = address[0]
                if self.scoped and address[3]:
                    source = scoped_source(address)
                server.log("%s/udp from %s port %d: %d bytes in, %d out" % (
                    self.service.name, source, address[1], count,
                    len(reply)))

    def answer(self, payload, address, destination):
        """The reply to one datagram, or None: counted, checked, made.

        Per datagram only what must be: the guard's port check, one cached
        decision per source address, the rate limit where the reply
        outgrows the request, and the loop watch (a checksum and two set
        look-ups).  Counted before the reply leaves, so that a client
        holding the reply sees it counted.  The reply is remembered for
        the loop watch as it is made, so that the next datagram (of the
        same batch, on the fast path) is checked against it; send_failed()
        forgets it again.
        """
        # Written for speed (it runs once a datagram): what does not
        # change is an attribute of the endpoint, looked up once here.
        counters = self.counters
        counters.datagrams += 1
        counters.bytes_in += len(payload)
        server = self.server
        if self.scoped and address[3]:
            source = scoped_source(address)     # fe80::1%2
        else:
            source = address[0]
        watch_loops = self.watch_loops
        if self.guarded and address[1] in server.guarded_ports:
            refusal = "loop-guard"
        else:
            refusal = server.source_refusals.get(source, _UNKNOWN)
            if refusal is _UNKNOWN:
                refusal = server.udp_source_refusal(source)
            if refusal is not None:
                pass
            elif destination is not None and self.guarded and \
                    _is_group_destination(destination):
                refusal = "group-destination"
            elif self.rate_limited:
                refusal = server.rate_limited(source)
            elif self.echo_limited:
                refusal = server.rate_limited(source, echo=True)
            if refusal is None and watch_loops:
                key = hash((address, crc32(payload)))
                if key in server.replied or key in server.replied_before:
                    refusal = server.reply_came_back(address)
        if refusal is not None:
            server.refuse(counters, refusal, source, "udp", self.service)
            return None
        if self.echoes:
            reply = payload
        else:
            reply = self.service.datagram_reply(server, payload, self)
            if reply is None:
                return None
        counters.bytes_out += len(reply)
        # Remember what goes where: echo's reply is the payload.  An empty
        # reply of chargen's is not remembered: its clients (and those of
        # daytime and time) send the same request, often an empty one,
        # again and again, and one empty reply would make each of them
        # look like our reply coming back.
        if watch_loops and (self.echoes or reply):
            if not self.echoes:
                key = _reply_key(address, reply)
            replied = server.replied
            replied.add(key)
            if len(replied) >= LOOP_TABLE_MAX:
                server.forget_old_replies()
        return reply

    def send_reply(self, reply, reply_info, address):
        """Send one reply; False if it could not leave."""
        try:
            if reply_info is not None:
                self.sock.sendmsg([reply], reply_info, 0, address)
            else:
                self.sock.sendto(reply, address)
        except OSError:
            self.send_failed(reply, address)
            return False
        return True

    def send_failed(self, reply, address):
        # Full buffer or unreachable: UDP may lose it anyway, and a queue
        # would let one source grow the server: drop it.  It never left,
        # so the loop watch forgets it (and an identical reply remembered
        # in the same second or two with it: a loop needs LOOP_RETURNS).
        self.counters.bytes_out -= len(reply)
        self.counters.refuse("send-failed")
        if self.watch_loops and (self.echoes or reply):
            self.server.replied.discard(_reply_key(address, reply))

    def _reply_from(self, ancillary):
        """(ancillary data for the reply, the datagram's destination)."""
        for level, kind, data in ancillary:
            if self.pktinfo == 4 and kind == IP_PKTINFO:
                destination = data[8:12]            # in_pktinfo.ipi_addr
                local = data[4:8]                   # in_pktinfo.ipi_spec_dst
                if local == b"\0\0\0\0":
                    local = destination
                elif local != destination:
                    # Linux sets ipi_spec_dst to the destination itself only
                    # for a local unicast address; for a broadcast or
                    # multicast one it is a unicast address of the host
                    # (fib_compute_spec_dst).  That is how a directed subnet
                    # broadcast (127.255.255.255, 192.0.2.255) shows itself:
                    # its address alone does not, it depends on a netmask.
                    destination = _LIMITED_BROADCAST
                # Linux sendmsg: ipi_spec_dst is the source to use.
                return [(socket.IPPROTO_IP, IP_PKTINFO,
                         b"\0\0\0\0" + local + b"\0\0\0\0")], destination
            if self.pktinfo == 6 and kind == IPV6_PKTINFO:
                # in6_pktinfo: the source to use, and an interface index
                # only where the address needs one (link-local; multicast
                # is refused anyway).  The index it arrived on would force
                # the reply out of that interface, and a datagram from ::1
                # to an address of eth0 arrived "on eth0": its reply, sent
                # out of eth0 to ::1, would never arrive.  Index 0 lets the
                # kernel route it as it routes anything else.
                destination = data[:16]
                if not _needs_interface(destination):
                    data = destination + b"\0\0\0\0"
                return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, data)], destination
        return None, None


# --- Linux fast path: a run of replies in one system call (UDP GSO) ---------
#
# Sending is what a UDP echo pays for: on Linux each sendto() takes one
# datagram through the whole stack (and, over loopback, into the
# receiver).  With UDP_SEGMENT (generic segmentation offload, Linux 4.18)
# one sendmsg() hands the kernel several replies to one address, all of one
# size but the last; the kernel (or the network card) cuts them into the
# same separate datagrams, boundaries and bytes unchanged, and does the
# per-packet work once.  The socket module's sendmsg() passes the buffers
# and the control message, so no buffer is handled outside Python.
#
# So the fast path reads up to SEGMENT_BATCH datagrams, each into a slot of
# its own, decides each one with DatagramEndpoint.answer() exactly as the
# portable path does, then sends the replies: runs to one address with one
# size as one GSO message, the rest one by one.  A message the kernel
# refuses is sent again datagram by datagram, as the portable path sends
# them, so counters and refusals come out the same.  The switch is thrown
# once, when a Server is made (udp_batching=True, the default): only on
# Linux, and only if a self-test sees two segments arrive as two datagrams
# over loopback (a kernel before 4.18 ignores the control message and would
# send one merged datagram).  Measured, and what was tried and dropped
# (recvmmsg/sendmmsg through ctypes): the README's Performance section.

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)     # linux/udp.h
# Datagrams read before their replies leave.  Eight measured best against
# 4, 16 and 64 with 16 datagrams in flight (README: Performance): the
# replies to the first eight leave while the client's next ones are on the
# way, so neither end sleeps between batches; CPU per datagram was lowest.
SEGMENT_BATCH = 8
# At most 64 segments a message (UDP_MAX_SEGMENTS), in all at most one
# IPv4 datagram's payload, each small enough for the smallest IPv6 link
# MTU (1280 bytes): no route's MTU makes the kernel refuse the size.
SEGMENTS_MAX = 64
SEGMENT_MAX = 1232
SEGMENTS_TOTAL_MAX = 65507
# A GSO message refused for what it is, not for where it goes: this
# socket stops making them.
_NO_SEGMENTING_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EINVAL", "EIO", "ENOPROTOOPT",
                                      "EOPNOTSUPP", "ENOTSUP")
    if hasattr(errno, name))

_segmentation_checked = None        # None, or (works, reason)


def _segmentation_works():
    """(True, "") if UDP_SEGMENT splits a send into datagrams here, else
    (False, why).  Tested once a process, over loopback."""
    global _segmentation_checked
    if _segmentation_checked is None:
        _segmentation_checked = _test_segmentation()
    return _segmentation_checked


def _test_segmentation():
    if not (_ON_LINUX and _HAS_MSG):
        return False, "not Linux"
    for family, host in ((socket.AF_INET, "127.0.0.1"),
                         (socket.AF_INET6, "::1")):
        sockets = []
        try:
            for _ in range(2):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind((host, 0))
            sender, receiver = sockets
            receiver.settimeout(1.0)
            sender.sendmsg([b"abc", b"de"], [(
                socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("@H", 3))], 0,
                receiver.getsockname())
            first = receiver.recv(16)
            second = receiver.recv(16)
            if (first, second) == (b"abc", b"de"):
                return True, ""
            return False, "UDP_SEGMENT self-test: got %r, %r" % (
                first, second)
        except OSError as error:
            reason = "UDP_SEGMENT self-test: %s" % (
                error.strerror or error,)
        finally:
            for sock in sockets:
                sock.close()
    return False, reason


def _segment_slots():
    """SEGMENT_BATCH receive buffers of DATAGRAM_BUFFER_SIZE, from one
    anonymous mmap: a page costs memory only once a datagram reaches it."""
    import mmap
    memory = mmap.mmap(-1, SEGMENT_BATCH * DATAGRAM_BUFFER_SIZE)
    view = memoryview(memory)
    return [view[start:start + DATAGRAM_BUFFER_SIZE]
            for start in range(0, len(view), DATAGRAM_BUFFER_SIZE)]


class SegmentingDatagramEndpoint(DatagramEndpoint):
    """A UDP socket whose replies leave in runs (see above)."""

    __slots__ = ("segmenting",)

    def __init__(self, server, sock, service, counters, pktinfo):
        DatagramEndpoint.__init__(self, server, sock, service, counters,
                                  pktinfo)
        self.segmenting = True

    def on_event(self, events):
        # Up to DATAGRAM_BATCH datagrams an event, as the portable path,
        # SEGMENT_BATCH at a time: a client waiting for replies gets the
        # first while the next are read.
        sock = self.sock
        pktinfo = self.pktinfo
        answer = self.answer
        slots = self.server.segment_slots
        reply_info = destination = None
        for _ in range(DATAGRAM_BATCH // SEGMENT_BATCH):
            segment_max = SEGMENT_MAX if self.segmenting else 0
            # Runs of replies: (replies, address, size, ancillary).  The
            # last run is open to one more reply while every reply so far
            # has its first one's size, and while it has fewer than
            # run_limit: SEGMENTS_MAX, and SEGMENTS_TOTAL_MAX bytes in all.
            runs = []
            run_replies = None
            run_open = False
            for slot in slots:
                try:
                    if pktinfo:
                        count, ancillary, _, address = sock.recvmsg_into(
                            [slot], _PKTINFO_ANCILLARY_SIZE)
                    else:
                        count, address = sock.recvfrom_into(slot)
                except BlockingIOError:
                    slot = None
                    break
                except ConnectionResetError:
                    continue
                if pktinfo:
                    reply_info, destination = self._reply_from(ancillary)
                reply = answer(slot[:count], address, destination)
                if reply is None:
                    continue
                size = len(reply)
                if (run_open and 0 < size <= run_size and
                        address == run_address and
                        reply_info == run_info and
                        len(run_replies) < run_limit):
                    run_replies.append(reply)
                    run_open = size == run_size
                else:
                    run_replies = [reply]
                    run_address, run_size, run_info = address, size, reply_info
                    run_open = 0 < size <= segment_max
                    if run_open:
                        run_limit = min(SEGMENTS_MAX,
                                        SEGMENTS_TOTAL_MAX // size)
                    runs.append((run_replies, address, size, reply_info))
            for replies, address, size, reply_info in runs:
                if len(replies) == 1:
                    self.send_reply(replies[0], reply_info, address)
                else:
                    self.send_run(replies, address, size, reply_info)
            if slot is None:            # drained
                return

    def send_run(self, replies, address, size, reply_info):
        """One GSO message of equal-sized replies (the last may be
        shorter) to one address."""
        ancillary = [(socket.IPPROTO_UDP, UDP_SEGMENT,
                      struct.pack("@H", size))]
        try:
            self.sock.sendmsg(replies, (reply_info or []) + ancillary, 0,
                              address)
        except OSError as error:
            # Refused whole: each datagram as the portable path sends it,
            # so that each is counted as it fares alone.
            if error.errno in _NO_SEGMENTING_ERRNOS:
                self.segmenting = False
            for reply in replies:
                self.send_reply(reply, reply_info, address)


# --- The event loop and the server, continued -----------------------------


class _Waker(object):
    """The read end of a socketpair: shutdown() from any thread writes one
    byte, and the loop wakes at once (no polling)."""

    def __init__(self):
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.sock = self.reader

    def wake(self):
        try:
            self.writer.send(b"\0")
        except OSError:         # full (already woken) or closed: fine
            pass

    def on_event(self, events):
        try:
            self.reader.recv(4096)
        except OSError:
            pass

    def close(self):
        self.reader.close()
        self.writer.close()


class _LogWriter(object):
    """The thread that writes the log, and the queue it writes from.

    It holds the queue, its wake-up socketpair and the stream, never the
    Server: a Server that nobody closes is still collected, and a
    weakref.finalize stops its writer then.  After os.fork() the child
    gets a writer of its own (the parent's thread does not exist there).
    """

    def __init__(self, stream):
        self.stream = stream            # None: sys.stderr at each write
        self.lines = collections.deque()
        self.thread = None
        self.wake_reader = self.wake_writer = None
        self.pid = os.getpid()
        self._start()
        _LOG_WRITERS.add(self)

    def _start(self):
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self.closing = False
        thread = threading.Thread(
            target=_run_log_writer, name="diagsvc-log",
            args=(self.lines, reader, self.stream, self))
        thread.daemon = True
        try:
            thread.start()
        except RuntimeError as error:   # "can't start new thread" (nproc)
            reader.close()
            writer.close()
            raise ServerError("cannot start the log thread: %s" % (error,))
        # Only a thread that runs is kept: close() joins nothing else.
        self.wake_reader, self.wake_writer = reader, writer
        self.thread = thread

    def after_fork_in_child(self):
        """The parent's thread is not here: start one (the queued lines
        are the parent's, which writes them)."""
        self.pid = os.getpid()
        if self.thread is None:
            return                      # stopped before the fork
        for sock in (self.wake_reader, self.wake_writer):
            sock.close()                # the child's copies only
        self.lines.clear()
        self.thread = None
        try:
            self._start()
        except ServerError:
            pass                        # log() then drops and counts

    def put(self, line):
        """Queue one line; False if it was dropped (stopped, or full)."""
        if self.pid != os.getpid():     # forked, without register_at_fork
            self.after_fork_in_child()
        if self.thread is None or len(self.lines) >= LOG_QUEUE_MAX:
            return False
        self.lines.append(line)
        try:
            self.wake_writer.send(b"\0")
        except OSError:                 # full (already woken) or closed
            pass
        return True

    def stop(self):
        """Write out what is queued, waiting LOG_DRAIN_TIMEOUT at most."""
        thread = self.thread
        if thread is None:
            return
        self.thread = None
        self.closing = True
        try:
            self.wake_writer.send(b"\0")
        except OSError:
            pass
        if thread is not threading.current_thread():
            thread.join(LOG_DRAIN_TIMEOUT)
        if not thread.is_alive():       # else it still holds them
            self.wake_reader.close()
            self.wake_writer.close()


def _run_log_writer(lines, wake_reader, stream, owner):
    """The log thread: write queued lines whenever woken, until closing."""
    while True:
        try:
            wake_reader.recv(4096)
        except OSError:
            return
        while lines:
            line = lines.popleft()
            out = stream or sys.stderr
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):   # a closed or full stderr
                pass                        # stops nothing
        if owner.closing:
            # Closed here too: stop() may not wait for this thread (the
            # collector can run it on this very thread, or the stream hangs).
            wake_reader.close()
            owner.wake_writer.close()
            return


_LOG_WRITERS = weakref.WeakSet()


def _log_writers_after_fork():
    for writer in list(_LOG_WRITERS):
        writer.after_fork_in_child()


if hasattr(os, "register_at_fork"):     # 3.7+; put() checks the pid too
    os.register_at_fork(after_in_child=_log_writers_after_fork)


def _is_select_based(selector_class):
    """True for select(), whose FD_SETSIZE bounds what the loop can watch."""
    select_selector = getattr(selectors, "SelectSelector", None)
    return select_selector is not None and isinstance(
        selector_class, type) and issubclass(selector_class, select_selector)


def default_max_connections(selector_class=None):
    """The total TCP connection limit: the open-file limit less a reserve
    (and under select(), FD_SETSIZE less the same reserve)."""
    limit = 1 << 20
    if resource is not None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            limit = soft
    elif _ON_WINDOWS:
        limit = 16384
    if _is_select_based(selector_class):
        limit = min(limit, SELECT_LIMIT)
    return max(1, limit - DESCRIPTOR_RESERVE)


def raise_open_file_limit():
    """Raise the soft RLIMIT_NOFILE to the hard one (Unix); return it."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # macOS refuses RLIM_INFINITY for the soft limit; OPEN_MAX is safe.
        hard = max(soft, 1 << 20) if _ON_LINUX else max(soft, 10240)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


def _resolve_bind(hosts):
    """(family, host, scope) for each bind address; names give all their
    addresses.  An IPv6 scope ("fe80::1%eth0") is kept as its interface
    index, sockaddr[3]: binding (host, port) alone would drop it."""
    found = []
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC,
                                       socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except socket.gaierror as error:
            raise ServerError("cannot resolve --bind %s: %s" % (
                host, error.strerror or error))
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            scope = sockaddr[3] if family == socket.AF_INET6 else 0
            entry = (family, sockaddr[0].partition("%")[0], scope)
            if entry not in found:
                found.append(entry)
    return found


def _bind_error(service, transport, host, port, error):
    where = "%s/%s on %s port %d" % (service, transport, host, port)
    if error.errno in (errno.EACCES, errno.EPERM):
        return ("cannot bind %s: permission denied (ports below 1024 need "
                "root); run as root or add --port-offset 10000" % where)
    if error.errno == errno.EADDRINUSE:
        return ("cannot bind %s: the port is in use by another program; "
                "stop it, or choose another port with --port %s=PORT or "
                "--port-offset N" % (where, service))
    if error.errno == errno.EADDRNOTAVAIL:
        return ("cannot bind %s: no such address on this host; check "
                "--bind" % where)
    return "cannot bind %s: %s" % (where, error.strerror or error)


# The shortest time between two WATCHDOG=1 messages, whatever WATCHDOG_USEC.
WATCHDOG_MIN_INTERVAL = 0.1


class SystemdNotifier(object):
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET.

    The server sends READY=1 once it serves every socket, STATUS= lines,
    WATCHDOG=1 every ``watchdog_interval`` seconds when systemd asks for it
    (WatchdogSec=), and STOPPING=1 when it stops.  The socket is
    non-blocking and every error is ignored: a service manager that went
    away must never stall or stop the loop.
    """

    def __init__(self, address, watchdog_interval=None):
        if address.startswith("@"):
            address = "\0" + address[1:]   # a Linux abstract socket name
        self.address = address
        self.watchdog_interval = watchdog_interval
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.set_inheritable(False)

    @classmethod
    def from_environment(cls, environ=None, pid=None):
        """A notifier for $NOTIFY_SOCKET, or None where it is unset or
        unusable here (no AF_UNIX, a vsock address)."""
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        address = environ.get("NOTIFY_SOCKET", "")
        if address[:1] not in ("/", "@") or len(address) < 2 or \
                not hasattr(socket, "AF_UNIX"):
            return None
        # sd_watchdog_enabled(3): WATCHDOG_USEC, for WATCHDOG_PID if set.
        interval = None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (
                not watchdog_pid or watchdog_pid == str(pid)):
            # systemd's advice: at half; but never more than ten a second,
            # whatever WATCHDOG_USEC says (1 would mean 2 000 000 a second).
            interval = max(int(usec) / 2e6, WATCHDOG_MIN_INTERVAL)
        try:
            return cls(address, interval)
        except OSError:
            return None

    def send(self, message):
        try:
            self.sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError:
            pass

    def close(self):
        self.sock.close()


_NO_PKTINFO_NOTE = (
    "this platform has no IP_PKTINFO: UDP replies on a wildcard address "
    "leave from the kernel's choice of source address; on a multi-homed "
    "host use --bind for each address")


def _match_sockets(sockets, services, transports, port_offset, ports):
    """[(socket, service, transport)] for sockets passed in, or ServerError.

    A socket's name picks its service when it is one ("echo"); systemd's
    default names (the unit's, "unknown") do not, and then its port does:
    a --port given for the service, else its standard port plus
    port_offset, else its standard port.  The transport is the socket's.
    """
    by_port = {}
    # A port that maps to two services asked for (echo's 7 + 2 is
    # discard's 9): matching by it would be a guess, so it is refused.
    ambiguous = {}
    for precedence in ("standard", "offset", "given"):
        for name in services:
            if precedence == "standard":
                port = SERVICES[name].port
            elif precedence == "offset":
                if not port_offset:
                    continue
                port = SERVICES[name].port + port_offset
            elif name in ports:
                port = ports[name]
            else:
                continue
            if by_port.get(port, name) != name:
                ambiguous.setdefault(port, {by_port[port]}).add(name)
            by_port[port] = name
    matched = []
    for sock, name in sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ServerError("the passed socket on fd %d is not an IPv4 or "
                              "IPv6 socket; pass TCP or UDP sockets only"
                              % sock.fileno())
        # SO_TYPE, not sock.type: before 3.7 that held SOCK_NONBLOCK too.
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        transport = {socket.SOCK_STREAM: "tcp",
                     socket.SOCK_DGRAM: "udp"}.get(kind)
        if transport is None:
            raise ServerError("the passed socket on fd %d is neither TCP "
                              "nor UDP" % sock.fileno())
        host, port = sock.getsockname()[:2]
        where = "the passed socket on fd %d (%s on %s port %d%s)" % (
            sock.fileno(), transport, host, port,
            ", named %r" % name if name else "")
        accepting = getattr(socket, "SO_ACCEPTCONN", None)
        if transport == "tcp" and accepting is not None and \
                not sock.getsockopt(socket.SOL_SOCKET, accepting):
            raise ServerError("%s is not listening; pass listening sockets "
                              "(ListenStream=, Accept=no)" % where)
        if port == 0:
            raise ServerError("%s is not bound to a port; pass bound sockets "
                              "(ListenStream=, ListenDatagram=)" % where)
        if name in SERVICES:
            if name not in services:
                raise ServerError("%s: %s is not among the services asked "
                                  "for (%s)" % (where, name,
                                                ", ".join(services)))
            service = name
        else:
            service = by_port.get(port)
            if port in ambiguous:
                raise ServerError(
                    "%s could be %s: name it with FileDescriptorName=, or "
                    "choose another --port-offset" % (
                        where, " or ".join(sorted(ambiguous[port]))))
            if service is None:
                raise ServerError(
                    "%s matches no service: name it after one with "
                    "FileDescriptorName= (%s), or listen on a service's "
                    "standard port or that plus --port-offset" % (
                        where, ", ".join(services)))
        if transport not in transports:
            raise ServerError("%s: only %s was asked for" % (
                where, "/".join(transports)))
        matched.append((sock, service, transport))
    return matched


def next_poll_window(window, slept, busy_poll, woken_by_event):
    """The busy poll's next window (seconds), after a poll of ``window``
    that caught nothing and a sleep: the loop has been idle for ``slept``
    (since its last event), and an event or a timer woke it.  The rule
    of Linux's cpuidle-haltpoll (Server._wait_for_events)."""
    if slept <= window:
        return window
    if slept <= busy_poll:
        if not woken_by_event:
            return window               # a timer: says nothing of traffic
        return min(busy_poll, max(BUSY_POLL_START, 2.0 * window))
    window /= 2.0
    return window if window >= BUSY_POLL_FLOOR else 0.0


class Server(object):
    """The diagnostic services on one selectors event loop.

    Constructing it binds every socket (so ``addresses`` is known, port 0
    included) or raises ServerError, closing whatever it had bound.  Given
    ``sockets`` (systemd's socket activation, say), it binds nothing and
    serves those instead, exactly as it would serve its own.

    Methods for the caller:

    serve_forever()   run the loop in this thread until shutdown()
    start()           run it in a daemon thread; returns at once, the
                      sockets being bound already (installs no signals)
    shutdown()        stop the loop, from any thread or a signal handler
    close()           stop the loop whoever runs it, wait for it, close
                      every socket; from any thread, any number of times
                      (on the loop's own thread it only asks: the sockets
                      are closed when serve_forever() returns).  This, or
                      the with block, is how a Server releases them
    addresses         {(service, transport): [(host, port), ...]}
    counters          {(service, transport): Counters}
    stats()           the counters as plain dicts
    log_counters()    write the counters to the log
    log_lines_suppressed, log_lines_dropped
                      log lines held back by the log's bucket, and lost
                      because the log was not keeping up (or came after
                      close(): log() never writes, or waits, itself)

    Arguments (all optional; the command line has the same):

    services          names from SERVICES (default: all six)
    bind              addresses or names (default: every IPv4 and IPv6
                      address: 0.0.0.0 and ::, IPv6 only where it exists)
    port_offset       added to each standard port; None: any free port
    ports             {service: port} overrides; 0 is any free port
    transports        ("tcp", "udp") or one of them
    quotes            qotd quotes, bytes with CRLF (see load_quotes())
    selector          a selectors class (default: the best one here)
    max_connections   TCP connections at once (default: from RLIMIT_NOFILE)
    max_per_source    TCP connections from one source (an address, or
                      an IPv6 /64: see ipv6_prefix); 0: no limit
    idle_timeout      close a TCP connection idle this long; 0: never
    max_output        bytes owed to one TCP connection, at most
    udp_guard         refuse datagrams that could start a loop or a flood,
                      and stop loops that started anyway
    udp_rate, udp_burst   replies a second per source for the services
                      whose reply outgrows the request; rate 0: no limit
    udp_echo_rate     echo replies a second per source, after a second's
                      worth at once; 0 (the default): no limit
    allow, deny       addresses or CIDR networks
    ipv4_prefix, ipv6_prefix
                      per-source limits (max_per_source, the UDP rate,
                      refusal log lines) count sources by network of this
                      length (default 32 and 64)
    verbosity         0 errors, 1 notices, 2 every connection and datagram
    log_file          where the log goes (default: sys.stderr)
    udp_batching      on Linux, send runs of UDP replies in one system
                      call (UDP_SEGMENT); False: one by one, as elsewhere
    sockets           [(socket, name)]: open sockets to serve instead of
                      binding (TCP ones listening).  Each is matched to
                      its service by name ("echo", ...) or else by its
                      port: the standard one, the standard one plus
                      port_offset, or the one ``ports`` gives.  The server
                      owns them from then on and closes them.
    duration          seconds: serve_forever() stops this long after the
                      server was made, and closes every socket; None (the
                      default) or 0 means no end (the command line's
                      --for 0 is refused instead)
    notifier          a SystemdNotifier: READY=1, STATUS=, WATCHDOG=1,
                      STOPPING=1 (see SystemdNotifier)
    busy_poll         seconds the loop may poll for the next event before
                      it sleeps, at most (the window adapts to the
                      traffic; see _wait_for_events); 0 (the default
                      here, where the loop shares a process and its GIL
                      with the caller): never.  The command line's
                      default is DEFAULT_BUSY_POLL
    """

    def __init__(self, services=None, bind=None, port_offset=0, ports=None,
                 transports=TRANSPORTS, quotes=None, selector=None,
                 max_connections=None,
                 max_per_source=DEFAULT_MAX_PER_SOURCE,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT,
                 max_output=DEFAULT_MAX_OUTPUT, udp_guard=True,
                 udp_rate=DEFAULT_UDP_RATE, udp_burst=DEFAULT_UDP_BURST,
                 allow=(), deny=(), verbosity=0, log_file=None,
                 ipv4_prefix=DEFAULT_IPV4_PREFIX,
                 ipv6_prefix=DEFAULT_IPV6_PREFIX, udp_echo_rate=0.0,
                 udp_batching=True,
                 sockets=None, duration=None, notifier=None, busy_poll=0.0):
        services = list(services or SERVICE_NAMES)
        for name in list(services) + list(ports or ()):
            if name not in SERVICES:
                raise ServerError("unknown service %r; choose from %s" % (
                    name, ", ".join(SERVICE_NAMES)))
        for transport in transports:
            if transport not in TRANSPORTS:
                raise ServerError("unknown transport %r" % (transport,))
        self.services = [name for name in SERVICE_NAMES if name in services]
        self.transports = [t for t in TRANSPORTS if t in transports]
        if duration is not None:
            _checked_limit("for", duration)     # a finite, datable end
        if quotes:                      # before sockets passed in are taken
            quotes = checked_quotes(quotes)
        adopted = None
        if sockets is not None:
            try:
                if bind:
                    raise ServerError("--bind has no meaning with sockets "
                                      "passed in (socket activation)")
                adopted = _match_sockets(sockets, self.services,
                                         self.transports, port_offset,
                                         ports or {})
            except BaseException:
                for sock, _ in sockets:
                    sock.close()
                raise
            self.services = [name for name in SERVICE_NAMES
                             if any(name == match[1] for match in adopted)]
            self.transports = [t for t in TRANSPORTS
                               if any(t == match[2] for match in adopted)]
        self.quotes = quotes if quotes else tuple(
            parse_quotes("\n%\n".join(BUILTIN_QUOTES)))
        self.selector_class = selector or SELECTORS[0]
        # Every number is checked here, for the command line and callers
        # alike: nan, inf or 10**400 would fail later, in the loop.
        if max_connections is not None:
            _checked_limit("max_connections", max_connections, whole=True)
        select_based = _is_select_based(self.selector_class)
        default_limit = default_max_connections(self.selector_class)
        if max_connections and select_based and max_connections > default_limit:
            # Refused rather than clamped: the user asked for a number the
            # loop cannot give, and should hear so at start.
            raise ServerError(
                "--max-connections %d is more than select() can watch here "
                "(at most %d: FD_SETSIZE %d less %d kept free); give %d or "
                "less, or another --selector" % (
                    max_connections, default_limit, SELECT_LIMIT,
                    DESCRIPTOR_RESERVE, default_limit))
        self.max_connections = max_connections or default_limit
        self.max_per_source = _checked_limit("max_per_source", max_per_source,
                                             whole=True)
        self.idle_timeout = _checked_limit("idle_timeout", idle_timeout)
        self.max_output = _checked_limit("max_output", max_output, whole=True)
        self.udp_guard = udp_guard
        self.udp_rate = _checked_limit("udp_rate", udp_rate)
        self.udp_burst = max(1, _checked_limit("udp_burst", udp_burst,
                                               whole=True))
        self.udp_echo_rate = _checked_limit("udp_echo_rate", udp_echo_rate)
        _checked_limit("ipv4_prefix", ipv4_prefix, 32, True)
        _checked_limit("ipv6_prefix", ipv6_prefix, 128, True)
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self._source_groups = {}        # address -> source_group(), bounded
        self.access = AccessList(allow, deny) if (allow or deny) else None
        self.verbosity = verbosity
        self.log_file = log_file
        self.notes = []                 # things the user should know
        self.duration = duration
        # The wall-clock end of the window, for the start lines.
        self.stops_at = time.time() + duration if duration else None
        self.notifier = notifier
        # Not _checked_limit(): its message names the command line's
        # option, which counts microseconds.
        if isinstance(busy_poll, bool) or not isinstance(
                busy_poll, (int, float)) or not 0 <= busy_poll <= 1.0:
            raise ServerError("busy_poll must be 0 to 1.0 seconds, not %r"
                              % (busy_poll,))
        self.busy_poll = busy_poll
        self._poll_window = 0.0         # the busy poll's window, adapting
        self._idle_since = None         # when the loop last ran dry

        self.now = time.monotonic()
        self.stream_buffer = memoryview(bytearray(STREAM_BUFFER_SIZE))
        self.datagram_buffer = memoryview(bytearray(DATAGRAM_BUFFER_SIZE))
        # The UDP path, chosen once: replies in runs where the kernel
        # passes the self-test; the per-datagram log (verbosity 2) is the
        # portable path's.  udp_batched says which one serves.
        self.udp_batched = False
        self.segment_slots = None
        if udp_batching and "udp" in self.transports and verbosity < 2:
            self.udp_batched, reason = _segmentation_works()
            if self.udp_batched:
                self.segment_slots = _segment_slots()
            elif _ON_LINUX:
                self.notes.append("%s: UDP replies leave one by one" %
                                  reason)
        self.streams = set()
        self.per_source = {}
        self.counters = dict(((name, transport), Counters())
                             for name in self.services
                             for transport in self.transports)
        self.addresses = dict((key, []) for key in self.counters)
        self.listeners = []
        self.endpoints = []
        self._rate_buckets = {}
        self._echo_buckets = {}
        self.source_refusals = {}       # UDP source address -> None/reason
        # The UDP loop watch: keys of replies sent in this generation and
        # the one before (see _reply_key), and how many of them each peer
        # has sent back lately.
        self.replied = set()
        self.replied_before = set()
        self._replies_aged = self.now
        self.loop_suspects = {}         # (host, port) -> returns, decaying
        self._returns_decayed = self.now    # its own clock: see below
        self._refusals_logged = {}
        self._log = None                # a _LogWriter, from here to close()
        self._log_tokens = float(LOG_BURST)
        self._log_tokens_stamp = self.now
        self.log_lines_suppressed = 0   # held back by the bucket
        self.log_lines_dropped = 0      # the queue was full
        self._suppressed_reported = 0
        self._suppressed_report_time = self.now
        self._accept_paused_until = None
        self._accept_pause_logged = None
        self._next_sweep = self.now + self._sweep_interval()
        self._stop_deadline = self.now + duration if duration else None
        self._next_status = self._next_watchdog = None
        self._ready_sent = False
        self._set_next_timer()
        self._stop_requested = False
        self._running = False
        self._closed = False
        self._closing = False
        self._thread = None
        # Lifecycle: close() may come from any thread, a signal handler or
        # the loop itself, while serve_forever() runs in any thread.  The
        # lock is re-entrant because a signal handler can interrupt the
        # thread that holds it; the event is set whenever no loop runs.
        self._state_lock = threading.RLock()
        self._loop_idle = threading.Event()
        self._loop_idle.set()
        self._loop_thread_id = None

        self.chargen_ring_file = None
        self._ring_file_to_close = None
        self.selector = None
        self._waker = None
        self._select_based = select_based
        try:
            self._log = _LogWriter(log_file)
            # An unreferenced Server is collected (its sockets close with
            # it); this stops its log thread then, or at close().
            self._stop_log = weakref.finalize(self, self._log.stop)
            if "chargen" in self.services and "tcp" in self.transports:
                self.chargen_ring_file = chargen_ring_file()
            self._ring_file_to_close = self.chargen_ring_file
            if self._ring_file_to_close is not None:
                self._close_ring = weakref.finalize(
                    self, os.close, self._ring_file_to_close)
            self.selector = self.selector_class()
            self._waker = _Waker()
            self._register_own(self._waker.sock, self._waker,
                               "the wake-up socket")
            if adopted is not None:
                for sock, name, transport in adopted:
                    self._serve_socket(name, transport, sock)
                    adopted = adopted[1:]       # the server owns it now
            else:
                self._open_sockets(bind, port_offset, ports or {})
        except BaseException as error:
            self.close()
            for sock, _, _ in adopted or ():
                sock.close()
            if isinstance(error, OSError):
                # Out of descriptors or memory, say: one line, nothing kept.
                raise ServerError("cannot start: %s" % (
                    error.strerror or error))
            raise
        # The source ports the UDP guard refuses: every port below 1024
        # (a service's, never a client's: port 0 and the standard ports
        # among them) and this server's own.  One set, so that the guard
        # costs a datagram one look-up.
        self.guarded_ports = frozenset(
            set(range(UDP_LOWEST_SOURCE_PORT)) | STANDARD_PORTS |
            set(port for bound in self.addresses.values() for _, port in bound))

    # -- Binding --

    def _open_sockets(self, bind, port_offset, ports):
        if bind:
            targets = _resolve_bind(bind)
        else:
            targets = [(socket.AF_INET, "0.0.0.0", 0)]
            if _ipv6_available():
                targets.append((socket.AF_INET6, "::", 0))
            else:
                self.notes.append("no IPv6 on this host: serving IPv4 only")
        for name in self.services:
            service = SERVICES[name]
            if name in ports:
                port = ports[name]
            elif port_offset is None:
                port = 0
            else:
                port = service.port + port_offset
            if not 0 <= port <= 65535:
                raise ServerError("%s would be on port %s, outside 0-65535; "
                                  "check --port-offset and --port" % (
                                      name, port if port < 10 ** 6
                                      else "%d..." % (port // 10 ** (
                                          len(str(port)) - 6))))
            bound = self._bind_service(name, port, targets)
            while bound:
                transport, _, _, sock = bound.pop(0)
                try:
                    self._serve_socket(name, transport, sock)
                except BaseException:
                    sock.close()        # (twice, if close() has it: harmless)
                    for _, _, _, left in bound:
                        left.close()
                    raise

    def _serve_socket(self, name, transport, sock):
        """Serve an open socket, bound here or passed in: one path for both,
        so that every limit and list applies to each alike."""
        sock.setblocking(False)
        service = SERVICES[name]
        counters = self.counters[name, transport]
        host = sock.getsockname()[0]
        if transport == "tcp":
            handler = Listener(self, sock, service, counters)
            self.listeners.append(handler)
        else:
            pktinfo = self._enable_pktinfo(sock, sock.family, host)
            endpoint_class = (SegmentingDatagramEndpoint if self.udp_batched
                              else DatagramEndpoint)
            handler = endpoint_class(self, sock, service, counters, pktinfo)
            self.endpoints.append(handler)
            if host in ("0.0.0.0", "::") and not pktinfo and \
                    _NO_PKTINFO_NOTE not in self.notes:
                self.notes.append(_NO_PKTINFO_NOTE)
        # close() closes it from here on
        self._register_own(sock, handler, "%s/%s on %s" % (
            name, transport, host))
        self.addresses[name, transport].append(handler.address)

    def _bind_service(self, name, port, targets):
        """Bind one service's sockets: [(transport, family, host, sock)].

        With port 0, every socket of the service takes the port the first
        one got (one port per service).  Another program may hold that
        number for the other transport (a client's ephemeral UDP port, say):
        then the service starts over on a fresh port, a few times.
        """
        for attempt in range(PORT_ZERO_ATTEMPTS):
            bound = []
            chosen = port
            try:
                for transport in self.transports:
                    for family, host, scope in targets:
                        sock = self._bind(name, transport, family, host,
                                          chosen, scope)
                        bound.append((transport, family, host, sock))
                        if chosen == 0:
                            chosen = sock.getsockname()[1]
                return bound
            except _PortTaken:
                for _, _, _, sock in bound:
                    sock.close()
                if port != 0 or attempt == PORT_ZERO_ATTEMPTS - 1:
                    raise
            except BaseException:
                for _, _, _, sock in bound:
                    sock.close()
                raise

    def _bind(self, name, transport, family, host, port, scope=0):
        kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        try:
            sock = socket.socket(family, kind)
        except OSError as error:
            raise ServerError("cannot create a %s socket for %s: %s" % (
                transport, host, error.strerror or error))
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if kind == socket.SOCK_STREAM:
                if _ON_WINDOWS:
                    # SO_REUSEADDR on Windows lets another program steal
                    # the port; exclusive use is the safe equivalent.
                    option = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
                    if option is not None:
                        sock.setsockopt(socket.SOL_SOCKET, option, 1)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                if family == socket.AF_INET6:
                    sock.bind((host, port, 0, scope))
                else:
                    sock.bind((host, port))
            except OSError as error:
                where = host
                if scope:
                    where += "%" + interface_name(scope)
                kind_of_error = (_PortTaken if error.errno == errno.EADDRINUSE
                                 else ServerError)
                raise kind_of_error(_bind_error(name, transport, where, port,
                                                error))
            if kind == socket.SOCK_STREAM:
                sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _enable_pktinfo(sock, family, host):
        """Ask for each datagram's destination, to answer from it (NetBSD
        inetd does this); only needed where the socket is a wildcard."""
        if not _HAS_MSG or host not in ("0.0.0.0", "::"):
            return 0
        try:
            if family == socket.AF_INET and IP_PKTINFO is not None:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                return 4
            if family == socket.AF_INET6 and IPV6_RECVPKTINFO is not None:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                return 6
        except OSError:
            pass
        return 0

    @property
    def max_output(self):
        """Bytes owed to one TCP connection, at most (echo reads no more
        than this, nor more than its buffer, before it is sent back)."""
        return self._max_output

    @max_output.setter
    def max_output(self, value):
        # Any value is kept as given; the read size is what bounds what is
        # owed, and it never exceeds the shared buffer, so a change made
        # while connections are open resets none of them.
        self._max_output = value
        self.echo_read_size = max(1, min(value, STREAM_BUFFER_SIZE))

    def can_watch(self, sock):
        """False where the loop's select() could not watch this socket."""
        if not self._select_based:
            return True
        if _ON_WINDOWS:
            return len(self.selector.get_map()) < SELECT_LIMIT
        return sock.fileno() < SELECT_LIMIT

    def _register_own(self, sock, handler, what):
        """Register a listener, datagram socket or the waker, or say why not."""
        if not self.can_watch(sock):
            raise ServerError(
                "cannot watch %s: select() takes descriptors below "
                "FD_SETSIZE (%d), and this one is %d; use --selector "
                "PollSelector or fewer --bind addresses" % (
                    what, SELECT_LIMIT, sock.fileno()))
        self.selector.register(sock, EVENT_READ, handler)

    # -- Logging and refusals --

    # The loop never writes the log itself: a reader that stops reading
    # stderr (a full pipe) would stop every service.  Lines go into a
    # bounded queue that a daemon thread, started by the constructor and
    # stopped by close(), writes out; when the queue is full, or after
    # close(), a line is dropped and counted: log() itself never writes.
    # stderr stays blocking (its descriptor is shared with the parent).
    # The writer is woken through a socketpair, not a lock, so log() is
    # safe in a signal handler.
    # Lines that a remote peer can cause (refusals, errors of one socket)
    # also pass a global token bucket: at most LOG_BURST at once, then
    # LOG_RATE a second, whatever the number of (spoofed) sources; what
    # it holds back is counted and reported in one line now and then.

    def log(self, message):
        """Write one line to the log without ever blocking the loop."""
        line = "%s diagsvc: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     message)
        if self._log is None or not self._log.put(line):
            # Closed, or the log is not keeping up: a write here could wait
            # for a full pipe (or for a writer stuck on one, which holds the
            # stream), in the loop or in a signal handler.
            self.log_lines_dropped += 1

    def notice(self, message):
        """log() for what a remote peer can cause: within the bucket."""
        now = self.now
        tokens = min(float(LOG_BURST), self._log_tokens +
                     (now - self._log_tokens_stamp) * LOG_RATE)
        self._log_tokens_stamp = now
        if tokens < 1.0:
            self._log_tokens = tokens
            self.log_lines_suppressed += 1
            return
        self._log_tokens = tokens - 1.0
        self.log(message)

    def _report_suppressed(self):
        held_back = self.log_lines_suppressed - self._suppressed_reported
        if held_back and self.now - self._suppressed_report_time >= \
                LOG_REPORT_INTERVAL:
            self._suppressed_reported = self.log_lines_suppressed
            self._suppressed_report_time = self.now
            self.log("%d log lines suppressed (at most %d at once, then %g "
                     "a second; the counters count every refusal)" % (
                         held_back, LOG_BURST, LOG_RATE))

    def refuse(self, counters, reason, source, transport, service):
        """Count a refusal; log it once per source, reason and interval."""
        counters.refuse(reason)
        if self.verbosity < 1:
            return
        key = (reason, self.group_of(source))
        last = self._refusals_logged.get(key)
        if last is not None and self.now - last < REFUSAL_LOG_INTERVAL:
            return
        if len(self._refusals_logged) >= 4096:
            self._refusals_logged.clear()
        self._refusals_logged[key] = self.now
        self.notice("refused %s/%s from %s: %s (logged once a %d s for this "
                 "source)" % (service.name, transport, source, reason,
                              REFUSAL_LOG_INTERVAL))

    # -- TCP --

    def admit(self, listener, sock, address):
        """A connection was accepted: refuse it, answer it, or keep it."""
        source = address[0]
        if len(address) > 3 and address[3]:
            source = scoped_source(address)
        counters = listener.counters
        service = listener.service
        reason = None
        if self.access is not None and not self.access.permits(source):
            reason = "denied"           # (the access list caches itself)
        elif len(self.streams) >= self.max_connections:
            reason = "max-connections"
        elif (self.max_per_source and
              self.per_source.get(self.group_of(source), 0) >=
              self.max_per_source):
            reason = "max-per-source"
        elif (self._select_based and not self.can_watch(sock) and
              service.stream_class is not None):
            reason = "unwatchable"      # select() past FD_SETSIZE
        if reason is not None:
            # Accept and close at once: the client learns now, and the
            # listen backlog does not fill up with clients we will not serve.
            # Counted first, so the count is right by the time it sees EOF.
            self.refuse(counters, reason, source, "tcp", service)
            sock.close()
            return
        counters.connections += 1
        if self.verbosity > 1:
            self.log("%s/tcp connection from %s port %d" % (
                service.name, source, address[1]))
        if service.stream_class is None:
            self._answer_once(sock, source, service, counters)
            return
        sock.setblocking(False)
        if service.stream_class is EchoStream:
            # Echo replies must not wait for Nagle on small writes.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._add_stream(service.stream_class(self, sock, source, counters))

    def _answer_once(self, sock, source, service, counters):
        """daytime, qotd, time: send at once, half-close, and wait in the
        loop for the client's close (OneShotStream says why)."""
        reply = service.tcp_reply(self)
        try:
            if _MSG_DONTWAIT:
                # MSG_MORE: the reply waits in the socket for the
                # half-close below, which sends it with the FIN in one
                # segment: one packet less for both ends (a reply the
                # socket did not take whole is pushed by the plain send
                # of the rest).
                sent = sock.send(reply, _MSG_DONTWAIT | _MSG_MORE)
            else:
                sock.setblocking(False)
                sent = sock.send(reply)
        except BlockingIOError:
            sent = 0
        except OSError:
            sock.close()
            return
        counters.bytes_out += sent
        if self._select_based and not self.can_watch(sock):
            # select() cannot wait for this one's close: answered and
            # closed at once, as before the linger (a reply under 512
            # bytes fits a new socket's buffer).  Pending input is read
            # first, so the close sends no reset for it.
            try:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv_into(self.stream_buffer, 0, _MSG_DONTWAIT):
                    pass
            except OSError:             # nothing (more) pending, or reset
                pass
            sock.close()
            return
        stream = OneShotStream(self, sock, source, counters)
        if sent < len(reply):
            sock.setblocking(False)
            stream.owed = memoryview(reply)[sent:]
            stream.events = EVENT_WRITE
        else:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:             # reset already: nothing to wait for
                sock.close()
                return
        self._add_stream(stream)

    def _add_stream(self, stream):
        try:
            self.selector.register(stream.sock, stream.events, stream)
        except (OSError, ValueError) as error:
            # A descriptor this selector cannot watch: refused, not fatal.
            stream.counters.refuse("unwatchable")
            stream.sock.close()
            self.notice("cannot watch a new connection: %s" % (error,))
            return
        self.streams.add(stream)
        group = self.group_of(stream.source)
        self.per_source[group] = self.per_source.get(group, 0) + 1

    def close_stream(self, stream):
        if stream not in self.streams:
            return                      # closed earlier in this same pass
        self.streams.discard(stream)
        group = self.group_of(stream.source)
        remaining = self.per_source.get(group, 0) - 1
        if remaining > 0:
            self.per_source[group] = remaining
        else:
            self.per_source.pop(group, None)
        try:
            self.selector.unregister(stream.sock)
        except (KeyError, ValueError, OSError):
            pass
        stream.sock.close()

    def pause_accepting(self, error):
        """Out of descriptors: stop watching the listeners for a while,
        rather than spin on a listener that stays readable."""
        if self._accept_paused_until is not None:
            return
        self._accept_paused_until = self.now + ACCEPT_PAUSE
        self._set_next_timer()
        for listener in self.listeners:
            self.selector.unregister(listener.sock)
        last = self._accept_pause_logged
        if last is None or self.now - last >= REFUSAL_LOG_INTERVAL:
            self._accept_pause_logged = self.now
            self.notice("cannot accept: %s; pausing accepts for %.2f s at a "
                     "time (%d connections open; raise the open-file limit "
                     "or lower --max-connections; logged once a %d s)" % (
                         error.strerror or error, ACCEPT_PAUSE,
                         len(self.streams), REFUSAL_LOG_INTERVAL))

    def _resume_accepting(self):
        self._accept_paused_until = None
        for listener in self.listeners:
            self.selector.register(listener.sock, EVENT_READ, listener)

    # -- UDP --

    def group_of(self, source):
        """source_group() of an address, cached (bounded)."""
        group = self._source_groups.get(source)
        if group is None:
            group = source_group(source, self.ipv4_prefix, self.ipv6_prefix)
            if len(self._source_groups) >= SOURCE_CACHE_MAX:
                self._source_groups.clear()
            self._source_groups[source] = group
        return group

    def udp_source_refusal(self, source):
        """What a datagram's source address alone says: None, or why to
        refuse.  Depends only on the address, so it is cached (bounded) and
        a flood from one source costs one dict look-up a datagram.
        """
        refusal = None
        if self.udp_guard and _is_group_address(source):
            refusal = "group-source"
        elif self.access is not None and not self.access.permits(source):
            refusal = "denied"
        if len(self.source_refusals) >= SOURCE_CACHE_MAX:
            self.source_refusals.clear()
        self.source_refusals[source] = refusal
        return refusal

    # An echo-echo loop, whatever the ports: what comes back from the
    # peer is exactly what we last sent it.  So is an echo-daytime or
    # echo-time loop within a second, and our chargen, qotd, daytime or
    # time against a foreign echo.  A loop holds a fixed payload, and it
    # ends with the first of its datagrams that gets no reply.  So what
    # is refused is only a datagram that repeats a reply sent to that same
    # peer (host and port) in the last 1-2 s, and only once that peer has
    # sent back LOOP_RETURNS of them, less one each LOOP_RETURN_INTERVAL:
    # a loop stops within LOOP_RETURNS round trips, while the peer's new
    # payloads are still answered.  A peer is never refused as a whole: a
    # spoofer can send anything "from" a client, and blocking the client
    # would hand the spoofer a way to cut it off.  A client that repeats a
    # payload gets LOOP_RETURNS repeats answered at once, then one a
    # second (probe sends its bytes up to 3 times; the README's example
    # sends "hello" a dozen times).  Replies are remembered by peer and
    # digest, not just the last one, so many loops started at once
    # (interleaved payloads) all count, and all end together.  A foreign
    # service that answers with new bytes every time (a chargen on a
    # non-standard port) cannot be told from a client by content; the
    # README says how to bound that.

    def reply_came_back(self, address):
        """A datagram from address repeats a reply we sent it: None (answer
        it), or "loop-detected" once LOOP_RETURNS have come back lately."""
        returns = self.loop_suspects.get(address, 0)
        if returns >= LOOP_RETURNS:
            return "loop-detected"
        if not returns and len(self.loop_suspects) >= LOOP_TABLE_MAX:
            self.loop_suspects.clear()
        self.loop_suspects[address] = returns + 1
        return None

    def forget_old_replies(self):
        """A new generation of remembered replies: the old one goes."""
        self.replied_before = self.replied
        self.replied = set()
        self._replies_aged = self.now

    def _age_loop_watch(self):
        # The count decays on its own clock: a generation also ends when
        # it is full (8,192 replies a second from anyone), and a decay
        # tied to that would never come under such a load.
        now = self.now
        if now - self._replies_aged >= LOOP_MEMORY:
            self.forget_old_replies()
        forgiven = int((now - self._returns_decayed) / LOOP_RETURN_INTERVAL)
        if forgiven > 0:
            self._returns_decayed += forgiven * LOOP_RETURN_INTERVAL
            if self.loop_suspects:
                self.loop_suspects = dict(
                    (address, returns - forgiven) for address, returns
                    in self.loop_suspects.items() if returns > forgiven)

    def rate_limited(self, source, echo=False):
        """A token bucket per source: udp_burst replies, then udp_rate/s;
        for echo (where udp_echo_rate is set) a second's worth at once,
        then udp_echo_rate/s."""
        now = self.now
        source = self._source_groups.get(source) or self.group_of(source)
        if echo:
            buckets, rate = self._echo_buckets, self.udp_echo_rate
            burst = max(1.0, rate)
        else:
            buckets, rate = self._rate_buckets, self.udp_rate
            burst = float(self.udp_burst)
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= RATE_TABLE_MAX:
                self._prune_rate_buckets()
                if len(buckets) >= RATE_TABLE_MAX:
                    return "rate-table-full"
            bucket = buckets[source] = [burst, now]
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return "rate-limit"
        bucket[0] = tokens - 1.0
        return None

    def _prune_rate_buckets(self):
        now = self.now
        for buckets, rate, burst in (
                (self._rate_buckets, self.udp_rate, self.udp_burst),
                (self._echo_buckets, self.udp_echo_rate,
                 max(1.0, self.udp_echo_rate))):
            full = [source for source, (tokens, stamp) in buckets.items()
                    if tokens + (now - stamp) * rate >= burst]
            for source in full:
                del buckets[source]

    # -- Timers: checked once a loop pass, nothing per byte --

    def _sweep_interval(self):
        if self.idle_timeout:
            return max(0.05, min(MAX_TIMER_WAIT, self.idle_timeout / 4.0))
        return MAX_TIMER_WAIT

    def _run_timers(self):
        now = self.now
        if self._stop_deadline is not None and now >= self._stop_deadline:
            self._stop_requested = True         # the window is over
        notifier = self.notifier
        if self._next_status is not None and now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            notifier.send("STATUS=" + self.status_line())
        if self._next_watchdog is not None and now >= self._next_watchdog:
            self._next_watchdog = now + notifier.watchdog_interval
            notifier.send("WATCHDOG=1")
        if (self._accept_paused_until is not None and
                now >= self._accept_paused_until):
            self._resume_accepting()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_interval()
            # A one-shot whose reply went out lingers for the client's
            # close at most ONE_SHOT_LINGER, or the idle timeout if that is
            # shorter; it was answered, so its end is no refusal.
            linger = ONE_SHOT_LINGER
            if self.idle_timeout:
                linger = min(linger, self.idle_timeout)
            linger_deadline = now - linger
            for stream in [s for s in self.streams
                           if type(s) is OneShotStream and
                           s.owed is None and
                           s.last_active < linger_deadline]:
                self.close_stream(stream)   # the reply went long ago
            if self.idle_timeout:
                deadline = now - self.idle_timeout
                for stream in [s for s in self.streams
                               if s.last_active < deadline and not (
                                   type(s) is OneShotStream and
                                   s.owed is None)]:
                    stream.counters.refuse("idle-timeout")
                    if self.verbosity > 1:
                        self.log("closing idle connection from %s" %
                                 stream.source)
                    self.close_stream(stream)
            if self._rate_buckets or self._echo_buckets:
                self._prune_rate_buckets()
            self._age_loop_watch()
            self._report_suppressed()
        self._set_next_timer()

    def _set_next_timer(self):
        """The loop's one wake-up time: the sweep, the end of a pause, the
        end of the window, or a message owed to systemd."""
        self._next_timer = min(
            when for when in (self._next_sweep, self._accept_paused_until,
                              self._stop_deadline, self._next_status,
                              self._next_watchdog) if when is not None)

    # -- systemd: readiness, status, watchdog (sd_notify(3)) --

    def status_line(self):
        """One line on what it serves and has done, for STATUS=."""
        totals = [0, 0, 0]
        for counters in self.counters.values():
            totals[0] += counters.connections
            totals[1] += counters.datagrams
            totals[2] += sum(counters.refusals.values())
        line = "serving %s on %d sockets; %d connections open; %d " \
            "connections, %d datagrams, %d refused so far" % (
                " ".join(self.services), len(self.listeners) +
                len(self.endpoints), len(self.streams), totals[0], totals[1],
                totals[2])
        if self.stops_at is not None:
            line += "; stops at " + time.strftime(
                "%H:%M:%S", time.localtime(self.stops_at))
        return line

    def _notify_ready(self):
        """READY=1 and the first STATUS=: every socket is served now."""
        self._ready_sent = True
        notifier = self.notifier
        notifier.send("READY=1\nSTATUS=" + self.status_line())
        self._next_status = self.now + STATUS_INTERVAL
        if notifier.watchdog_interval:
            notifier.send("WATCHDOG=1")
            self._next_watchdog = self.now + notifier.watchdog_interval
        self._set_next_timer()

    def _close_window(self):
        """The duration is over: close every socket, as close() will, from
        the loop's own thread before it ends (close() may wait for that).
        Not under the lock, as serve_forever()'s end: a close() from a
        signal handler may close the same sockets meanwhile, harmlessly."""
        if self._closed:
            return
        for stream in list(self.streams):
            self.close_stream(stream)
        for handler in self.listeners + self.endpoints:
            try:
                self.selector.unregister(handler.sock)
            except (KeyError, ValueError, OSError):
                pass                    # unwatched during an accept pause
            handler.sock.close()
        self.listeners = []
        self.endpoints = []

    # -- The loop --

    def serve_forever(self):
        """Run until shutdown() or close().  Errors of one socket close that
        socket.  Returns at once if close() came first.  An error of the
        selector itself is logged; the loop carries on if dropping the
        registrations it cannot watch cures it, else the error is raised.
        """
        with self._state_lock:
            if self._closing:
                return                  # close() came first: nothing to run
            if self._running:
                raise RuntimeError("serve_forever() is already running")
            self._running = True
            self._loop_thread_id = threading.get_ident()
            self._loop_idle.clear()
        try:
            select = self.selector.select
            if self.busy_poll:
                select = self._wait_for_events
            monotonic = time.monotonic
            self.now = monotonic()
            if self.notifier is not None and not self._ready_sent:
                self._notify_ready()
            while not self._stop_requested:
                # One clock read a pass: the wait is measured from the
                # last one, at most a pass's work late, and timers are
                # coarse (the sweep is at most once a second).
                wait = self._next_timer - self.now
                try:
                    ready = select(wait if wait > 0.0 else 0.0)
                except Exception as error:
                    if self._stop_requested:
                        break           # closed under us (a signal handler)
                    if self._selector_failed(error):
                        continue
                    raise
                self.now = monotonic()
                for key, events in ready:
                    if self._stop_requested:
                        break           # a handler called close()
                    handler = key.data
                    try:
                        handler.on_event(events)
                    except Exception as error:
                        self._handler_failed(handler, error)
                if self.now >= self._next_timer and not self._stop_requested:
                    self._run_timers()
        finally:
            if self.notifier is not None:
                self.notifier.send("STOPPING=1")
            if self._stop_deadline is not None and \
                    self.now >= self._stop_deadline:
                self._close_window()
            if self._closing:
                # close() on this thread (a handler, a signal handler) only
                # asked: the teardown is done here, between passes, where
                # nothing iterates over what it closes.
                self._teardown()
            # Not under the lock: a close() waiting for this event may be
            # holding it (re-entered from a signal handler).  The event is
            # set before the thread id is cleared, so that a signal
            # handler's close() on this thread never waits for it.
            self._running = False
            self._loop_idle.set()
            self._loop_thread_id = None
            if self._closing:
                self._teardown()        # a close() that came meanwhile

    def _wait_for_events(self, timeout):
        """select(timeout), but first poll for up to the busy-poll window.

        A process asleep in epoll_wait() is woken by the kernel when an
        event comes, and on a virtual machine whose idle CPU halts (a
        cloud VM's usual setting) that wake-up costs tens of
        microseconds: most of a loopback ping-pong's round trip, and
        jitter in every latency a client measures through us.  So when
        the loop runs out of events it keeps polling (select(0)) for a
        window before it sleeps, once an idle spell: a timer that wakes
        it meanwhile finds it asleep again at once.  The window adapts as
        Linux's cpuidle-haltpoll does, by the length of the whole idle
        spell, from the last event to the next (next_poll_window()): a
        spell longer than the window but within busy_poll doubles it
        (from BUSY_POLL_START), since polling that long would have caught
        the event; a spell longer than busy_poll halves it, timer by
        timer; an event caught by polling keeps it.  Sparse traffic
        closes the window within a few events, so an idle server sleeps
        as before; round trips that come less than about busy_poll apart
        keep one core busy, the price of answering without the wake-up.
        """
        select = self.selector.select
        monotonic = time.monotonic
        ready = select(0.0)
        if not ready:
            if timeout <= 0.0:
                return ready
            started = now = monotonic()
            if self._idle_since is None:        # the spell starts: poll
                self._idle_since = started
                until = started + min(self._poll_window, timeout)
                while now < until and not self._stop_requested:
                    ready = select(0.0)
                    if ready:
                        self._idle_since = None
                        return ready            # caught: the window stands
                    now = monotonic()
            ready = select(max(0.0, timeout - (now - started)))
        if self._idle_since is not None:
            # An event or a timer within a spell (also one that the timers
            # ended, found by the first select above): adapt by its length.
            self._poll_window = next_poll_window(
                self._poll_window, monotonic() - self._idle_since,
                self.busy_poll, bool(ready))
            if ready:
                self._idle_since = None
        return ready

    def _selector_failed(self, error):
        """select() itself raised: log it, drop what it cannot watch (a
        closed descriptor, one past FD_SETSIZE).  True if that may cure it."""
        import traceback
        self.log("the event loop's %s failed:\n%s" % (
            type(self.selector).__name__, "".join(
                traceback.format_exception(type(error), error,
                                           error.__traceback__)).rstrip()))
        dropped = 0
        for key in list(self.selector.get_map().values()):
            fd = key.fileobj.fileno()
            if fd >= 0 and not (self._select_based and not _ON_WINDOWS and
                                fd >= SELECT_LIMIT):
                continue
            dropped += 1
            handler = key.data
            if isinstance(handler, Stream):
                handler.counters.refuse("unwatchable")
                self.close_stream(handler)
            else:
                try:
                    self.selector.unregister(key.fileobj)
                except (KeyError, ValueError, OSError):
                    pass
                self.log("stopped watching descriptor %d (%s)" % (
                    fd, type(handler).__name__))
        if dropped:
            self.log("dropped %d descriptor(s) the selector cannot watch; "
                     "the server carries on" % dropped)
            return True
        self.log("the event loop stops: the selector cannot go on")
        return False

    def _handler_failed(self, handler, error):
        if isinstance(error, BlockingIOError):
            # Readiness that did not hold (select() and poll() may report
            # it): nothing to do until the next event, nothing to close.
            return
        if isinstance(handler, Stream):
            self.close_stream(handler)
            if isinstance(error, (OSError, ValueError)):
                if self.verbosity > 1:  # resets, broken pipes: routine
                    self.log("connection from %s closed: %s" % (
                        handler.source, error))
                return
        elif isinstance(error, OSError):
            self.notice("%s/%s: %s" % (
                handler.service.name,
                "tcp" if isinstance(handler, Listener) else "udp", error))
            return
        import traceback
        self.notice("unexpected error, the server carries on:\n" + "".join(
            traceback.format_exception(type(error), error,
                                       error.__traceback__)).rstrip())

    def start(self):
        """serve_forever() in a daemon thread; return the server."""
        if self._thread is not None:
            raise RuntimeError("start() was called already")
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="diagsvc")
        self._thread.daemon = True
        self._thread.start()
        return self

    def shutdown(self):
        """Stop serve_forever() at once; safe from any thread or signal."""
        self._stop_requested = True
        waker = self._waker
        if waker is not None and not self._closed:
            waker.wake()                # a closed waker is ignored

    def close(self):
        """Stop the loop, wait for it, and close every socket.

        Safe from any thread, a signal handler or the loop itself, any
        number of times.  From any other thread, when it returns no loop
        runs (whoever started it) and every descriptor is closed.  On the
        loop's own thread (a handler, or a signal handler interrupting the
        loop) it only asks: the loop stops after the current step, and
        serve_forever() closes every descriptor before it returns.
        """
        self.shutdown()
        with self._state_lock:
            self._closing = True        # a serve_forever() yet to come
            if self._loop_thread_id == threading.get_ident():
                return                  # serve_forever()'s finally does it
        self._loop_idle.wait()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._teardown()

    def _teardown(self):
        """Close everything, once; each step alone, so that one failure
        (a broken selector, say) cannot leave the rest open."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            for stream in list(self.streams):
                self._quietly(self.close_stream, stream)
                self._quietly(stream.sock.close)
            self.streams.clear()
            self.per_source.clear()
            for handler in self.listeners + self.endpoints:
                self._quietly(handler.sock.close)
            self.listeners = []
            self.endpoints = []
            if self._waker is not None:
                self._quietly(self._waker.close)
            if self.selector is not None:
                self._quietly(self.selector.close)
            if self._log is not None:
                self._quietly(self._stop_log)
            if self._ring_file_to_close is not None:
                self._quietly(self._close_ring)
                self._ring_file_to_close = self.chargen_ring_file = None

    @staticmethod
    def _quietly(step, *arguments):
        try:
            step(*arguments)
        except Exception:               # nowhere to report it, nothing to
            pass                        # gain by stopping the teardown

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- Visibility --

    def stats(self):
        """{(service, transport): {connections, datagrams, bytes_in,
        bytes_out, refusals: {reason: count}}}"""
        return dict((key, counters.as_dict())
                    for key, counters in self.counters.items())

    def log_counters(self):
        for (name, transport), counters in sorted(self.counters.items()):
            refusals = ", ".join("%s %d" % item for item in
                                 sorted(counters.refusals.items()))
            self.log("%s/%s: %d %s, %d bytes in, %d bytes out%s" % (
                name, transport,
                counters.connections if transport == "tcp" else
                counters.datagrams,
                "connections" if transport == "tcp" else "datagrams",
                counters.bytes_in, counters.bytes_out,
                "; refused: " + refusals if refusals else ""))
        if self.log_lines_suppressed or self.log_lines_dropped:
            self.log("log: %d lines suppressed by the bucket, %d dropped "
                     "(the log was not keeping up)" % (
                         self.log_lines_suppressed, self.log_lines_dropped))


# --- Privileges ----------------------------------------------------------------


def drop_privileges(user):
    """Become ``user`` with no supplementary groups, if running as root.

    Returns a description of who the process runs as now.  Raises
    ServerError when the user does not exist.  Where the platform has no
    such calls (Windows), says so and changes nothing.
    """
    if not hasattr(os, "geteuid"):
        return "the account that started it (this platform cannot drop privileges)"
    import pwd
    if os.geteuid() != 0 or user == "root":
        name = pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() != 0 else "root"
        return "user %s (uid %d)" % (name, os.geteuid())
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ServerError("no user %r on this host to drop privileges to; "
                          "name one with --user NAME (or --user root to "
                          "keep root)" % (user,))
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    return "user %s (uid %d)" % (user, entry.pw_uid)


# --- The client side --------------------------------------------------------

# probe: is each service open, and does it answer as its RFC says?  measure:
# how fast is the path?  Both work against any RFC-conforming server (inetd
# and xinetd included), from one selectors loop where there is concurrency.

PROBE_OK = ("open", "open|filtered")
MEASURE_TESTS = ("latency", "download", "upload", "echo", "connect", "udp",
                 "loaded", "mtu")
# Run when no test is named.  udp, loaded and mtu only when named: loaded
# saturates the path, udp's load is the user's choice, mtu sends 64 KiB.
DEFAULT_MEASURE_TESTS = MEASURE_TESTS[:5]
# The service each test measures (connect: daytime or time, as asked).
_MEASURE_SERVICE = {"latency": "echo", "download": "chargen",
                    "upload": "discard", "echo": "echo", "udp": "echo",
                    "loaded": "echo", "mtu": "echo"}
# The transport of a test's one row when an error stops it (loaded: both).
_MEASURE_TRANSPORT = {"udp": "udp", "mtu": "udp"}
DEFAULT_PROBE_TIMEOUT = 2.0
_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN,
                          10035))       # 10035: Windows' WSAEWOULDBLOCK
_CHARGEN_DOUBLE_PERIOD = CHARGEN_PERIOD * 2
# A TCP chargen probe reads a whole period and a line: every wrap is seen.
_CHARGEN_PROBE_SIZE = CHARGEN_PERIOD_SIZE + CHARGEN_LINE_SIZE


def _resolve_targets(host, family=None):
    """[(family, sockaddr)] for every address HOST resolves to.

    The whole sockaddr is kept, not its address string: a link-local IPv6
    address means nothing without its scope (fe80::1%eth0), and since
    Python 3.7 the scope is only in the sockaddr's fourth field.
    """
    wanted = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family,
                                                          socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(host, None, wanted, socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ServerError("cannot resolve %s: %s" % (host,
                                                      error.strerror or error))
    found = []
    for info_family, _, _, _, sockaddr in infos:
        entry = (info_family, sockaddr)
        if info_family in (socket.AF_INET, socket.AF_INET6) and \
                entry not in found:
            found.append(entry)
    return found


def _endpoint(sockaddr, port):
    """A resolved sockaddr with PORT, for connect(): the scope kept."""
    return (sockaddr[0], port) + tuple(sockaddr[2:])


def _shown_address(sockaddr):
    """The address as a person writes it: fe80::1%eth0, with its scope."""
    address = sockaddr[0]
    if len(sockaddr) > 3 and sockaddr[3] and "%" not in address:
        try:
            address += "%" + socket.if_indextoname(sockaddr[3])
        except (AttributeError, OSError):   # no name: the index will do
            address += "%%%d" % sockaddr[3]
    return address


def _socket_error(error):
    """The reason a socket call failed, in a few words."""
    return error.strerror or str(error) or type(error).__name__


def _require_duration(name, value):
    """A timeout or a duration given to probe() or measure(): a finite
    number above 0, or ValueError.  nan compares false with everything, so
    a deadline of now + nan never comes and a loop waiting for it spins
    for ever; inf overflows select(); 0 waits for nothing and calls every
    port filtered."""
    if not 0 < value < float("inf"):
        raise ValueError("%s must be a finite number above 0, not %r"
                         % (name, value))


def _service_port(name, port_offset, ports):
    if ports and name in ports:
        return ports[name]
    return SERVICES[name].port + (port_offset or 0)


def _printable(data, extra=b"\r\n"):
    return all(32 <= byte < 127 or byte in extra for byte in data)


def _first_difference(received, expected):
    """The index of the first byte where two equal-length buffers differ."""
    return next(i for i in range(len(received))
                if received[i] != expected[i])


def _chargen_problem(data):
    """None if data is a piece of the RFC 864 stream, else where it is not.

    The piece may start anywhere in the ring (xinetd starts each connection
    where the last one stopped); it is aligned by its first character.
    """
    if not data:
        return None
    first = data[0]
    start = data.find(b"\r\n")
    if not 32 <= first < 127:
        return "byte 0 is %r, not a printable character" % bytes(data[:1])
    # Align: the first full line tells which ring line this is.
    if 0 <= start < len(data) - 2:
        line = data[start + 2] - 32
        offset = (line * CHARGEN_LINE_SIZE - start - 2) % CHARGEN_PERIOD_SIZE
    else:
        offset = (first - 32) * CHARGEN_LINE_SIZE
    expected = (_CHARGEN_DOUBLE_PERIOD * (len(data) // CHARGEN_PERIOD_SIZE + 2)
                )[offset:offset + len(data)]
    if data == expected:
        return None
    at = _first_difference(data, expected)
    return ("not the RFC 864 ring: byte %d is %r where the ring has %r" % (
        at, bytes(data[at:at + 1]), bytes(expected[at:at + 1])))


def _clock_offset(seconds):
    # daytime and time have one-second resolution: an offset under a
    # second (either way, after truncation and the round trip) is no offset.
    offset = seconds - time.time()
    if -2.0 < offset < 1.0:
        return "matches the local clock to the second"
    return "%+.0f s from the local clock" % offset


def _daytime_detail(data):
    text = data.decode("ascii").strip()
    parts = text.split()
    try:
        # The BSD inetd form: 'Mon Jan 19 17:43:18 2009'
        month = [m.lower() for m in _MONTH_NAMES].index(parts[1].lower()) + 1
        hour, minute, second = (int(p) for p in parts[3].split(":"))
        stamp = time.mktime((int(parts[4]), month, int(parts[2]), hour,
                             minute, second, 0, 0, -1))
        return "%s (%s)" % (text, _clock_offset(stamp))
    except (IndexError, ValueError, OverflowError):
        return text


def _time_detail(data):
    value = struct.unpack("!I", data)[0] - TIME_EPOCH_OFFSET
    era = 1 << 32                       # RFC 868's era: the nearest to now
    value += era * round((time.time() - value) / era)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    return "%s (%s)" % (stamp, _clock_offset(value))


def _judge(service, transport, data, sent, closed):
    """(verdict, detail) for what a service answered."""
    if service == "echo":
        if data == sent:
            return "open", "%d bytes echoed and matched" % len(sent)
        if not data:
            return "wrong", "sent %d bytes, none came back%s" % (
                len(sent), " before the close" if closed else "")
        if len(data) != len(sent):
            return "wrong", "sent %d bytes, %d came back" % (len(sent),
                                                             len(data))
        return "wrong", "echoed bytes differ from byte %d on" % (
            _first_difference(data, sent))
    if service == "discard":
        if data:
            return "wrong", "discard sent %d bytes back" % len(data)
        return "open", "took the data, sent nothing"
    if service == "chargen":
        if transport == "udp" and len(data) > UDP_CHARGEN_MAX:
            return "wrong", "%d bytes in one datagram; RFC 864 allows 0-512" \
                % len(data)
        if transport == "tcp" and len(data) < _CHARGEN_PROBE_SIZE:
            return "wrong", "only %d bytes before %s" % (
                len(data), "the close" if closed else "the timeout")
        problem = _chargen_problem(data[:_CHARGEN_PROBE_SIZE])
        if problem:
            return "wrong", problem
        if transport == "udp":
            return "open", "%d characters of the ring" % len(data)
        return "open", "%d lines match the ring, from %r" % (
            _CHARGEN_PROBE_SIZE // CHARGEN_LINE_SIZE,
            data[:12].decode("ascii"))
    if not data:
        return "wrong", "no data before %s" % ("the close" if closed else
                                               "the timeout")
    if service == "time":
        if len(data) != 4:
            return "wrong", "%d bytes; RFC 868 sends 4" % len(data)
        return "open", _time_detail(data)
    if not _printable(data, b"\r\n\t"):
        return "wrong", "not printable ASCII: %r" % bytes(data[:30])
    if service == "daytime":
        return "open", _daytime_detail(data)
    if len(data) >= 512:
        return "wrong", "quote of %d characters; RFC 865 wants under 512" \
            % len(data)
    words = " ".join(data.decode("ascii").split())
    return "open", words[:40] + ("..." if len(words) > 40 else "")


# A TCP discard probe sends its data, then waits this long (or three
# round trips, if longer) before it half-closes.  A real discard keeps the
# connection open until our half-close; a server that accepted only to
# close at once (a --deny, a per-source limit) shows its EOF, or a reset,
# in that window, and is not reported as having taken the data.
_DISCARD_SETTLE = 0.25


class _Probe(object):
    """One service, transport and address: a small state machine.

    Any socket error ends this probe alone, with the verdict 'error' (or
    'refused') and its reason: one unroutable address or a scope that
    does not exist never costs the other rows.
    """

    def __init__(self, service, transport, family, sockaddr, port, timeout,
                 now):
        self.service = service
        self.transport = transport
        self.address = _shown_address(sockaddr)
        self.port = port
        self.deadline = now + timeout
        self.timeout = timeout
        self.data = bytearray()
        self.rtt = None
        self.row = None
        self.sock = None
        self.connected = False
        self.half_close_at = None       # TCP discard, between send and shutdown
        self.sent = (b"diagsvc probe " + os.urandom(9).hex().encode() +
                     b"\r\n") if service in ("echo", "discard") else b""
        self.started = self.next_send = self.last_send = now
        self.sends = 0
        if transport == "udp" and service not in ("echo", "time"):
            # RFC 868 clients send an empty datagram; the others ignore it.
            self.sent = b"diagsvc probe\r\n"
        self.events = EVENT_WRITE if transport == "tcp" else EVENT_READ
        try:
            self._open(family, _endpoint(sockaddr, port))
        except OSError as error:
            self._error(error)

    def _open(self, family, endpoint):
        kind = socket.SOCK_STREAM if self.transport == "tcp" else \
            socket.SOCK_DGRAM
        self.sock = socket.socket(family, kind)
        self.sock.setblocking(False)
        if self.transport == "tcp":
            self.started = time.monotonic()
            code = self.sock.connect_ex(endpoint)
            if code and code not in _IN_PROGRESS:
                self._failed(code)
        else:
            self.sock.connect(endpoint)

    def finish(self, verdict, detail):
        if self.row is None:
            self.row = {"service": self.service, "transport": self.transport,
                        "address": self.address, "port": self.port,
                        "verdict": verdict,
                        "rtt_ms": None if self.rtt is None else
                        round(self.rtt * 1000.0, 3),
                        "detail": detail}

    def _failed(self, code):
        if code == errno.ECONNREFUSED or code == 10061:
            self.finish("refused", "TCP reset: nothing listens"
                        if self.transport == "tcp" else
                        "ICMP port unreachable: nothing listens")
        else:
            self.finish("error", os.strerror(code))

    def _error(self, error):
        if isinstance(error, ConnectionRefusedError):
            self._failed(errno.ECONNREFUSED)
        else:
            self.finish("error", _socket_error(error))

    def wake_time(self):
        if self.transport == "udp" and self.sends < 3:
            return min(self.deadline, self.next_send)
        if self.half_close_at is not None:
            return min(self.deadline, self.half_close_at)
        return self.deadline

    def on_timer(self, now):
        if now >= self.deadline:
            self._expire()
        elif self.transport == "udp" and now >= self.next_send:
            self._send_datagram(now)
        elif self.half_close_at is not None and now >= self.half_close_at:
            self._half_close()

    def _send_datagram(self, now):
        # Three tries spread over the timeout: UDP may lose one.
        self.sends += 1
        self.last_send = now
        self.next_send = now + self.timeout / 3.0
        try:
            self.sock.send(self.sent)
        except OSError as error:
            self._error(error)

    def _expire(self):
        if self.transport == "udp":
            if self.service == "discard":
                self.finish("open|filtered", "no reply, as RFC 863 says "
                            "(or filtered: discard never answers)")
            else:
                self.finish("no-reply", "nothing within %g s: filtered, or "
                            "closed with ICMP blocked" % self.timeout)
        elif not self.connected:
            self.finish("timeout", "no answer to the TCP connect within "
                        "%g s: filtered" % self.timeout)
        else:
            self._conclude(closed=False)

    def _conclude(self, closed, reset=False):
        """The TCP verdict, from what came back and how it ended."""
        if self.service == "discard" and not self.data and (
                reset or (closed and self.half_close_at is not None)):
            # A discard reads until the client's half-close: a close before
            # it, or a reset (a close with our data unread), means the data
            # was never taken.
            return self.finish("wrong", "%s without reading the data" % (
                "reset the connection" if reset else
                "closed the connection before our half-close"))
        self.finish(*_judge(self.service, "tcp", bytes(self.data), self.sent,
                            closed))

    def _half_close(self):
        """TCP discard: nothing came back in the settling time; half-close."""
        if self._receive():
            return
        self.half_close_at = None
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            self._conclude(closed=True, reset=True)
        except OSError as error:
            self._error(error)

    def _receive(self):
        """Read what the service sent; True once that decides the verdict."""
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            if self.service == "discard":
                self._conclude(closed=True, reset=True)
            else:
                self._conclude(closed=True)
            return True
        except OSError as error:
            self._error(error)
            return True
        if chunk:
            self.data += chunk
            enough = (_CHARGEN_PROBE_SIZE if self.service == "chargen"
                      else 4096)
            if len(self.data) < enough:
                return False
        self._conclude(closed=not chunk)
        return True

    def _connected(self, now):
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self._failed(code)
        self.connected = True
        self.rtt = now - self.started
        self.events = EVENT_READ
        if not self.sent:
            return
        try:
            self.sock.send(self.sent)           # tiny: the buffer is empty
            if self.service == "discard":
                self.half_close_at = now + min(
                    max(_DISCARD_SETTLE, 3.0 * self.rtt),
                    (self.deadline - now) / 2.0)
            else:
                self.sock.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            self._conclude(closed=True, reset=True)
        except OSError as error:
            self._error(error)

    def on_event(self, now):
        if self.transport == "tcp":
            if self.connected:
                self._receive()
            else:
                self._connected(now)
            return
        try:
            reply = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            # Windows reports a UDP port unreachable as WSAECONNRESET.
            return self._failed(errno.ECONNREFUSED)
        except OSError as error:
            return self._error(error)
        self.rtt = now - self.last_send
        if self.service == "discard":
            return self.finish("wrong", "discard answered with %d bytes"
                               % len(reply))
        self.finish(*_judge(self.service, "udp", reply, self.sent, True))

    def close(self):
        if self.sock is not None:
            self.sock.close()


def probe(host, services=None, transports=TRANSPORTS, port_offset=0,
          ports=None, family=None, timeout=DEFAULT_PROBE_TIMEOUT):
    """Probe each service and transport on every address of HOST at once.

    Returns a list of dicts with the keys service, transport, address,
    port, verdict (open, open|filtered, refused, no-reply, timeout, wrong,
    error), rtt_ms (TCP: the connect; UDP: the request) and detail.
    Everything runs concurrently: the whole probe takes about one timeout
    (a finite number of seconds above 0, else ValueError).
    The loop sleeps until the next event or timer: a finished probe leaves
    the selector at once, or its readable socket (EOF) would wake it in a
    busy loop until the last probe is done.
    """
    _require_duration("timeout", timeout)
    services = [name for name in SERVICE_NAMES if name in (services or
                                                          SERVICE_NAMES)]
    now = time.monotonic()
    probes = []
    selector = SELECTORS[0]()
    try:
        for target_family, sockaddr in _resolve_targets(host, family):
            for name in services:
                for transport in TRANSPORTS:
                    if transport in transports:
                        probes.append(_Probe(
                            name, transport, target_family, sockaddr,
                            _service_port(name, port_offset, ports),
                            timeout, now))
        pending = []
        for task in probes:
            if task.row is None:
                try:
                    selector.register(task.sock, task.events, task)
                except (OSError, ValueError) as error:
                    task.finish("error", "cannot watch the socket: %s" % (
                        _socket_error(error)
                        if isinstance(error, OSError) else error))
                else:
                    pending.append(task)
        while pending:
            now = time.monotonic()
            for task in pending:
                if task.row is None and now >= task.wake_time():
                    task.on_timer(now)
            if all(task.row is None for task in pending):
                wait = min(task.wake_time() for task in pending) - now
                for key, _ in selector.select(max(0.0, wait)):
                    task = key.data
                    if task.row is None:
                        events = task.events
                        task.on_event(time.monotonic())
                        if task.row is None and task.events != events:
                            selector.modify(task.sock, task.events, task)
            for task in pending:
                if task.row is not None:
                    selector.unregister(task.sock)
            pending = [task for task in pending if task.row is None]
    finally:
        for task in probes:
            task.close()
        selector.close()
    rows = [task.row for task in probes]
    for row in rows:
        row["host"] = host
    return rows


# -- measure --


def _nearest_rank(ordered, percent):
    """The PERCENT-th percentile of sorted samples, by nearest rank.

    The nearest-rank definition: the ceil(PERCENT / 100 * n)-th smallest
    sample (p50 of [1, 2] is 1; p99 of 100 samples is the 99th; p99 of
    fewer than 100 is the largest).  Always a value that was measured.
    In integers: 0.9 * 10 is 9.000000000000002 in floating point, and its
    ceiling would be one rank high.
    """
    rank = max(1, -(-percent * len(ordered) // 100))
    return ordered[rank - 1]


def _percentiles(samples):
    """min, p50, p90, p99 and max in µs (nearest rank); {} for no samples."""
    samples = sorted(samples)
    if not samples:
        return {}
    def at(percent):
        return round(_nearest_rank(samples, percent) * 1e6, 1)
    return {"min_us": round(samples[0] * 1e6, 1), "p50_us": at(50),
            "p90_us": at(90), "p99_us": at(99),
            "max_us": round(samples[-1] * 1e6, 1)}


class _Progress(object):
    """One status line updated in place on stderr, only on a terminal; and
    with --interval, a row every `interval` seconds during each test.

    A test calls begin() with a function giving its running totals (counts
    that only grow, plus "rtts": a list of round-trip times it appends to),
    then tick() from its loop, waking by wake(); each interval row holds the
    differences since the previous row, and emit(row) writes it out.
    """

    def __init__(self, enabled, interval=None, emit=None):
        self.enabled = enabled
        self.last = 0.0
        self.interval = interval or 0.0
        self.emit = emit
        self.totals = None

    def show(self, text):
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.25:
            self.last = now
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()

    def clear(self):
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def begin(self, test, transport, totals):
        self.finish()
        if not self.interval:
            return
        now = time.monotonic()
        self.test, self.transport, self.totals = test, transport, totals
        self.started = self.mark = now
        self.next_row = now + self.interval
        current = totals()
        self.previous = self._counts(current)
        self.rtts_seen = len(current.get("rtts", ()))

    def wake(self, now):
        """Seconds until the next interval row is due (at most 3600)."""
        if self.totals is None:
            return 3600.0
        return max(0.0, self.next_row - now)

    def tick(self, now=None):
        if self.totals is not None:
            now = time.monotonic() if now is None else now
            if now >= self.next_row:
                self._row(now)
                # Rows on the interval's grid, as iperf3 does; skip a
                # boundary that a long wait has already passed.
                while self.next_row <= now:
                    self.next_row += self.interval

    def finish(self):
        """The test is over: its last, shorter interval, unless that is
        under a tenth of an interval with nothing in it (esnet/iperf#592
        drops the same sliver)."""
        if self.totals is not None:
            now = time.monotonic()
            if now - self.mark >= self.interval / 10.0 or \
                    self._counts(self.totals()) != self.previous:
                self._row(now)
            self.totals = None

    @staticmethod
    def _counts(current):
        return dict((key, value) for key, value in current.items()
                    if isinstance(value, (int, float)) and
                    not isinstance(value, bool))

    def _row(self, now):
        current = self.totals()
        span = max(1e-9, now - self.mark)
        row = {"type": "interval", "test": self.test,
               "transport": self.transport,
               "start_s": round(self.mark - self.started, 3),
               "end_s": round(now - self.started, 3)}
        counts = self._counts(current)
        for key, value in sorted(counts.items()):
            delta = value - self.previous.get(key, 0)
            row[key] = delta
            if key == "bytes":
                row["mbyte_per_s"] = round(delta / 1e6 / span, 3)
            else:
                row[key + "_per_s"] = round(delta / span, 1)
        for key, value in current.items():
            if key != "rtts" and key not in counts:
                row[key] = value            # a label, such as a phase
        rtts = current.get("rtts")
        if rtts is not None:
            row.update(_percentiles(rtts[self.rtts_seen:]))
            self.rtts_seen = len(rtts)
        self.previous = counts
        self.mark = now
        self.clear()
        self.emit(row)


def _connect(family, address, port, timeout):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(_endpoint(address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _recv_rest(sock, received, size, timeout):
    """Read up to SIZE bytes in all, within one timeout: an echo that
    trickles a byte at a time cannot stretch one round trip for ever.
    Fewer than SIZE bytes back means the echo closed the connection."""
    deadline = time.monotonic() + timeout
    while received and len(received) < size:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    sock.settimeout(timeout)
    return received


def _late_ping(reply, sequence):
    """True for the echo of an earlier ping than SEQUENCE (a UDP reply that
    came after its ping was counted lost).  Only a reply in the ping's own
    form is parsed: anything else is a wrong reply, never a number."""
    return (len(reply) == 32 and reply[:31].isdigit() and
            reply[31:] == b"\n" and int(reply[:31]) < sequence)


def _measure_latency(family, address, ports, seconds, progress, timeout):
    """Echo ping-pong with 32-byte messages, TCP (TCP_NODELAY) and UDP.

    Each ping ends in a sample (its echo came back), a wrong reply
    (anything else came back: counted, the next ping follows) or, for UDP,
    a loss (nothing within the timeout, at most 1 s).  A socket error, or
    an echo that closes, ends that transport's row with an error; the
    other transport is still measured.
    """
    rows = []
    clock = time.perf_counter
    for transport in ("tcp", "udp"):
        samples = []
        lost = wrong = 0
        error = None
        sock = None
        try:
            if transport == "tcp":
                sock = _connect(family, address, ports["echo"], timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.settimeout(min(timeout, 1.0))
                sock.connect(_endpoint(address, ports["echo"]))
            progress.begin("latency", transport,
                           lambda: {"count": len(samples), "rtts": samples})
            end = time.monotonic() + seconds
            sequence = 0
            while time.monotonic() < end:
                sequence += 1
                message = b"%031d\n" % sequence
                started = clock()
                sock.send(message)
                if transport == "tcp":
                    reply = sock.recv(32)
                    if len(reply) < 32:
                        reply = _recv_rest(sock, reply, 32, timeout)
                    if len(reply) < 32:
                        error = "echo closed the connection"
                        break
                else:
                    try:
                        reply = sock.recv(64)
                        while _late_ping(reply, sequence):
                            reply = sock.recv(64)   # a late one: skip it
                    except socket.timeout:
                        lost += 1
                        continue
                if reply != message:
                    wrong += 1
                    continue
                samples.append(clock() - started)
                progress.tick()
                progress.show("latency %s: %d round trips" % (
                    transport, len(samples)))
        except OSError as failure:
            error = _socket_error(failure)
        finally:
            progress.finish()           # this transport's intervals
            if sock is not None:
                sock.close()
        figures = _percentiles(samples)
        row = {"test": "latency", "transport": transport, "unit": "µs",
               "value": figures.get("p50_us"), "count": len(samples),
               "wrong_replies": wrong}
        pings = lost + wrong + len(samples)     # those that ended
        if transport == "udp" and pings:
            row["loss_pct"] = round(100.0 * lost / pings, 2)
        if error is not None:
            row["error"] = error
        row.update(figures)
        rows.append(row)
    return rows


def _stream_loop(connections, seconds, on_ready, progress, label):
    """Run a selectors loop over connections for `seconds`."""
    selector = SELECTORS[0]()
    try:
        for conn in connections:
            conn.sock.setblocking(False)
            selector.register(conn.sock, conn.events, conn)
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if now >= end or not selector.get_map():
                break
            for key, events in selector.select(min(0.25, end - now,
                                                   progress.wake(now))):
                if not on_ready(key.data, events):
                    selector.unregister(key.fileobj)
            progress.tick()
            progress.show(label())
    finally:
        selector.close()


class _Flow(object):
    """One connection of a stream test: its counts, and how it ended if
    that was before the test's window closed."""

    __slots__ = ("sock", "events", "bytes", "offset", "wrong", "first_wrong",
                 "last", "ended_at", "ended_how")

    def __init__(self, sock, events):
        self.sock = sock
        self.events = events
        self.bytes = 0
        self.offset = None
        self.wrong = 0
        self.first_wrong = None
        self.last = time.monotonic()    # when data last moved
        self.ended_at = None
        self.ended_how = None

    def end(self, how, when=None):
        """Record the first way this connection ended early."""
        if self.ended_at is None:
            self.ended_at = time.monotonic() if when is None else when
            self.ended_how = how

    def check_stall(self, now, stall):
        """Nothing moved for STALL seconds before NOW: it stalled, when it
        last moved data (a chargen that stops sending is no download)."""
        if now - self.last >= stall:
            self.end("stalled", self.last)


def _stream_error(error):
    """How a stream connection ended, from the socket error that said so."""
    if isinstance(error, ConnectionResetError):
        return "reset by the server"
    if isinstance(error, BrokenPipeError):
        return "closed by the server"
    return _socket_error(error)


def _endings(flows, started):
    """A stream test's ended_early, and when and how the first one ended."""
    ended = [flow for flow in flows if flow.ended_at is not None]
    figures = {"ended_early": len(ended)}
    if ended:
        first = min(ended, key=lambda flow: flow.ended_at)
        figures["ended_at_s"] = round(max(0.0, first.ended_at - started), 2)
        figures["ended_how"] = first.ended_how
    return figures


def _count_wrong(received, expected):
    return sum(1 for a, b in zip(received, expected) if a != b)


def _measure_download(family, address, ports, seconds, parallel, progress,
                      timeout):
    """chargen over N TCP connections; every byte checked against the ring."""
    flows = [_Flow(_connect(family, address, ports["chargen"], timeout),
                   EVENT_READ) for _ in range(parallel)]
    buffer = bytearray(CHARGEN_CHUNK)
    view = memoryview(buffer)
    started = time.monotonic()

    def on_ready(flow, events):
        try:
            count = flow.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as error:
            flow.end(_stream_error(error))
            return False
        if not count:                   # a chargen never closes first
            flow.end("closed by the server")
            return False
        flow.last = time.monotonic()
        if flow.offset is None:         # where in the ring this server starts
            line = buffer[0] - 32 if 32 <= buffer[0] < 127 else 0
            flow.offset = line * CHARGEN_LINE_SIZE
        offset = flow.offset
        expected = CHARGEN_VIEW[offset:offset + count]
        if not buffer.startswith(expected):   # memcmp speed
            wrong = _count_wrong(view[:count], expected)
            if flow.first_wrong is None:
                flow.first_wrong = flow.bytes + _first_difference(
                    view[:count], expected)
            flow.wrong += wrong
        flow.bytes += count
        flow.offset = (offset + count) % CHARGEN_PERIOD_SIZE
        return True

    progress.begin("download", "tcp",
                   lambda: {"bytes": sum(flow.bytes for flow in flows)})
    try:
        _stream_loop(flows, seconds, on_ready, progress, lambda: (
            "download: %.0f MB/s" % (sum(f.bytes for f in flows) / 1e6 /
                                     max(1e-6, time.monotonic() - started))))
        stopped = time.monotonic()
        for flow in flows:
            flow.check_stall(stopped, timeout)
    finally:
        for flow in flows:
            flow.sock.close()
    # The window asked for, or longer if the loop overran it: connections
    # that ended early do not shorten it into a burst's rate.
    window = max(seconds, stopped - started)
    total = sum(flow.bytes for flow in flows)
    wrong = sum(flow.wrong for flow in flows)
    row = {"test": "download", "transport": "tcp", "unit": "MB/s",
           "value": round(total / 1e6 / window, 1), "bytes": total,
           "seconds": round(window, 2), "parallel": parallel,
           "wrong_bytes": wrong}
    row.update(_endings(flows, started))
    firsts = [f.first_wrong for f in flows if f.first_wrong is not None]
    if firsts:
        row["first_wrong_byte"] = min(firsts)
    return [row]


def _measure_upload(family, address, ports, seconds, parallel, progress,
                    timeout):
    """discard over N TCP connections: bytes the server took, drained."""
    flows = [_Flow(_connect(family, address, ports["discard"], timeout),
                   EVENT_WRITE) for _ in range(parallel)]
    block = memoryview(bytes(CHARGEN_CHUNK))
    started = time.monotonic()

    def on_ready(flow, events):
        try:
            flow.bytes += flow.sock.send(block)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:        # the server closed or reset it
            flow.end(_stream_error(error))
            return False
        return True

    buffer = bytearray(65536)
    drain = {"half_closed": 0, "closed": 0, "returned": 0}

    def on_drain(flow, events):
        try:
            count = flow.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:                 # a reset: some data was never read
            return False
        if count:                       # not a discard: stop reading it
            drain["returned"] += count
            return False
        drain["closed"] += 1
        return False

    progress.begin("upload", "tcp",
                   lambda: {"bytes": sum(flow.bytes for flow in flows)})
    try:
        _stream_loop(flows, seconds, on_ready, progress, lambda: (
            "upload: %.0f MB/s" % (sum(f.bytes for f in flows) / 1e6 /
                                   max(1e-6, time.monotonic() - started))))
        # Half-close and wait for the server's close: then every byte
        # counted was read by the server, not sitting in a buffer.  One
        # deadline for all the flows: a "discard" that streams back (say
        # --port discard=19, a chargen) or never closes cannot hold it.
        # A connection that ended early has nothing to drain.
        for flow in flows:
            flow.events = 0
            if flow.ended_at is None:
                try:
                    flow.sock.shutdown(socket.SHUT_WR)
                except OSError as error:
                    flow.end(_stream_error(error))
                else:
                    flow.events = EVENT_READ
                    drain["half_closed"] += 1
        _stream_loop([flow for flow in flows if flow.events], max(
            timeout, 2.0), on_drain, progress, lambda: "upload: draining")
        drained = time.monotonic()
    finally:
        for flow in flows:
            flow.sock.close()
    # From the start until the server's close showed every byte read (at
    # least the window asked for: an early end does not shorten it).
    window = max(seconds, drained - started)
    total = sum(flow.bytes for flow in flows)
    row = {"test": "upload", "transport": "tcp", "unit": "MB/s",
           "value": round(total / 1e6 / window, 1), "bytes": total,
           "seconds": round(window, 2), "parallel": parallel,
           "drained": 0 < drain["half_closed"] == drain["closed"],
           "returned_bytes": drain["returned"]}
    row.update(_endings(flows, started))
    return [row]


# The echo test's pattern: a prime period, so a lost, repeated or reordered
# block never lines up with the expected bytes by chance.
_ECHO_PERIOD = 65521


def _echo_pattern():
    seed = bytearray(os.urandom(_ECHO_PERIOD))
    return memoryview(bytes(seed) * (CHARGEN_CHUNK // _ECHO_PERIOD + 2))


def _measure_echo(family, address, ports, seconds, progress, timeout):
    """Bulk echo over one TCP connection, every byte compared."""
    sock = _connect(family, address, ports["echo"], timeout)
    pattern = _echo_pattern()
    buffer = bytearray(CHARGEN_CHUNK)
    view = memoryview(buffer)
    state = {"sent": 0, "received": 0, "wrong": 0, "writing": True}
    flow = _Flow(sock, EVENT_READ | EVENT_WRITE)
    started = time.monotonic()

    def on_ready(flow, events):
        # Until our half-close (while writing), any end is the server's
        # early one; after it, its close is the normal end.
        if events & EVENT_WRITE and state["writing"]:
            offset = state["sent"] % _ECHO_PERIOD
            try:
                state["sent"] += sock.send(pattern[offset:offset + 65536])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as error:
                flow.end(_stream_error(error))
                return False
        if events & EVENT_READ:
            try:
                count = sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as error:
                if state["writing"]:
                    flow.end(_stream_error(error))
                return False
            if not count:
                if state["writing"]:
                    flow.end("closed by the server")
                return False
            flow.last = time.monotonic()
            offset = state["received"] % _ECHO_PERIOD
            expected = pattern[offset:offset + count]
            if not buffer.startswith(expected):
                state["wrong"] += _count_wrong(view[:count], expected)
            state["received"] += count
        return True

    progress.begin("echo", "tcp", lambda: {"bytes": state["received"]})
    try:
        _stream_loop([flow], seconds, on_ready, progress, lambda: (
            "echo: %.0f MB/s" % (state["received"] / 1e6 /
                                 max(1e-6, time.monotonic() - started))))
        stopped = time.monotonic()
        echoed_in_window = state["received"]
        flow.check_stall(stopped, timeout)
        # Half-close and collect the rest: anything never echoed is missing.
        state["writing"] = False
        if flow.ended_at is None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as error:
                flow.end(_stream_error(error))
            else:
                flow.events = EVENT_READ
                _stream_loop([flow], max(timeout, 3.0), on_ready, progress,
                             lambda: "echo: draining")
    finally:
        sock.close()
    # The window asked for, or longer if the loop overran it.
    window = max(seconds, stopped - started)
    row = {"test": "echo", "transport": "tcp", "unit": "MB/s",
           "value": round(echoed_in_window / 1e6 / window, 1),
           "bytes": echoed_in_window, "seconds": round(window, 2),
           "wrong_bytes": state["wrong"],
           "missing_bytes": state["sent"] - state["received"]}
    row.update(_endings([flow], started))
    return [row]


def _measure_connect(family, address, ports, seconds, parallel, progress,
                     timeout, service="daytime"):
    """daytime (or time) connections a second, `parallel` in flight."""
    port = ports[service]
    errors = {}
    durations = []
    selector = SELECTORS[0]()
    started = time.monotonic()
    end = started + seconds

    def open_one():
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(_endpoint(address, port))
        if code and code not in _IN_PROGRESS:
            sock.close()
            kind = ("refused" if code in (errno.ECONNREFUSED, 10061)
                    else os.strerror(code))
            errors[kind] = errors.get(kind, 0) + 1
            return
        selector.register(sock, EVENT_READ, [sock, time.monotonic(), 0])

    def close_one(key, outcome):
        selector.unregister(key.fileobj)
        key.fileobj.close()
        if outcome is None:
            durations.append(time.monotonic() - key.data[1])
        else:
            errors[outcome] = errors.get(outcome, 0) + 1

    try:
        progress.begin("connect", "tcp", lambda: {
            "count": len(durations), "errors": sum(errors.values())})
        for _ in range(parallel):
            open_one()
        while True:
            now = time.monotonic()
            if now >= end:
                break
            for key, _ in selector.select(min(0.1, end - now,
                                              progress.wake(now))):
                state = key.data
                try:
                    chunk = state[0].recv(4096)
                except ConnectionRefusedError:
                    close_one(key, "refused")
                except ConnectionResetError:
                    close_one(key, "reset")
                except OSError as error:
                    close_one(key, error.strerror or str(error))
                else:
                    if chunk:
                        state[2] += len(chunk)
                        continue
                    close_one(key, None if state[2] else "empty")
                if time.monotonic() < end:
                    open_one()
            now = time.monotonic()
            for key in list(selector.get_map().values()):
                if now - key.data[1] > timeout:
                    close_one(key, "timeout")
                    open_one()
            progress.tick()
            progress.show("connect: %d connections" % len(durations))
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    elapsed = time.monotonic() - started
    row = {"test": "connect", "transport": "tcp", "unit": "conn/s",
           "service": service, "value": round(len(durations) / elapsed, 1),
           "count": len(durations), "parallel": parallel,
           "errors": sum(errors.values()), "error_kinds": errors}
    row.update(_percentiles(durations))
    return [row]


# -- udp: a paced, sequence-numbered echo stream --

# Each datagram's payload: a magic, the flow's id, the sequence number and the
# send time (the sender's perf_counter, in seconds), then zeros up to the size
# asked.  The far end only has to echo it, so any RFC 862 server will do.
_STREAM_MAGIC = b"dsv1"
_STREAM_HEADER = struct.Struct("!4sIQd")
STREAM_MIN_SIZE = _STREAM_HEADER.size          # 24 bytes
# The largest UDP payload: 65,535 less the IPv4 (20) and UDP (8) headers; an
# IPv6 payload length does not count its 40-byte header (RFC 8200).
STREAM_MAX_SIZE = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
DEFAULT_STREAM_RATE = 100.0     # pps: 64-byte datagrams, 51 kbit/s, safe
DEFAULT_STREAM_SIZE = 64        # on any shared link
_STREAM_BATCH = 1024            # at most this many sends between two reads
_STREAM_CATCH_UP = 0.99         # below 99 % of the asked rate: client-limited
# At most this many datagrams in one udp test (all flows): each one costs 8
# bytes of RTT record, so 10^7 is 80 MB; a larger rate * seconds is refused.
STREAM_MAX_DATAGRAMS = 10 ** 7
# Replies wait in the kernel while the sender works through a batch: a
# larger receive buffer (the kernel caps it at net.core.rmem_max) keeps a
# busy client from losing them and blaming the path.
_STREAM_RECEIVE_BUFFER = 4 << 20


def stream_datagram(flow_id, sequence, sent_at, size):
    """One udp-test payload of `size` bytes (STREAM_MIN_SIZE at least)."""
    payload = bytearray(max(size, STREAM_MIN_SIZE))
    _STREAM_HEADER.pack_into(payload, 0, _STREAM_MAGIC, flow_id, sequence,
                             sent_at)
    return bytes(payload)


def parse_stream_datagram(data):
    """(flow_id, sequence, sent_at), or None if data is not a udp-test payload."""
    if len(data) < STREAM_MIN_SIZE or bytes(data[:4]) != _STREAM_MAGIC:
        return None
    _, flow_id, sequence, sent_at = _STREAM_HEADER.unpack_from(data)
    return flow_id, sequence, sent_at


class _StreamTally(object):
    """One flow's arithmetic: what came back, in which order, and when.

    arrived() is called for every reply.  A sequence number seen before is a
    duplicate; a new one below the highest seen so far is reordered (RFC
    4737's Type-P-Reordered: below NextExp).  _stream_figures(tallies,
    wait) then counts a reply as received when it came within `wait`
    seconds of its send, late when it came after that, and the rest of what
    was sent as lost.
    """

    def __init__(self, planned, rtts=None):
        from array import array
        self.rtt_by_sequence = array("d", [-1.0]) * planned
        self.sent = 0
        self.arrivals = 0           # distinct sequence numbers back
        self.duplicated = 0
        self.reordered = 0
        self.foreign = 0            # not ours, never sent, or cut short
        self.highest = -1
        # Every RTT in arrival order, for --interval rows only (a list of
        # floats costs some 32 bytes a datagram): None keeps none.
        self.rtts = rtts

    def arrived(self, sequence, rtt):
        if sequence >= self.sent:
            self.foreign += 1
            return
        if self.rtt_by_sequence[sequence] >= 0.0:
            self.duplicated += 1
            return
        self.rtt_by_sequence[sequence] = rtt = max(0.0, rtt)
        if self.rtts is not None:
            self.rtts.append(rtt)
        self.arrivals += 1
        if sequence < self.highest:
            self.reordered += 1
        else:
            self.highest = sequence

    def on_time(self, wait):
        """RTTs within the wait, in sequence order (-1 for none)."""
        return [rtt if rtt <= wait else -1.0
                for rtt in self.rtt_by_sequence[:self.sent]]


def _stream_figures(tallies, wait):
    """The figures of one flow, or of several added up (pure arithmetic)."""
    sent = sum(tally.sent for tally in tallies)
    samples = []
    differences = []
    late = 0
    for tally in tallies:
        by_sequence = tally.on_time(wait)
        samples.extend(rtt for rtt in by_sequence if rtt >= 0.0)
        late += tally.arrivals - sum(1 for rtt in by_sequence if rtt >= 0.0)
        # RFC 3393 IPDV between consecutive packets of the stream, both
        # answered in time.
        differences.extend(abs(later - earlier) for earlier, later in
                           zip(by_sequence, by_sequence[1:])
                           if earlier >= 0.0 and later >= 0.0)
    received = len(samples)
    lost = sent - received - late
    row = {"sent": sent, "received": received, "lost": lost,
           "loss_pct": round(100.0 * lost / sent, 2) if sent else 0.0,
           "late": late, "late_after_s": wait,
           "duplicated": sum(tally.duplicated for tally in tallies),
           "reordered": sum(tally.reordered for tally in tallies),
           "foreign": sum(tally.foreign for tally in tallies)}
    figures = _percentiles(samples)
    row.update(figures)
    if figures:
        # RFC 5481 PDV: a high percentile of delay (here p99) less the
        # minimum: what a de-jitter buffer must hold.
        row["pdv_us"] = round(figures["p99_us"] - figures["min_us"], 1)
    if differences:
        row["ipdv_mean_us"] = round(sum(differences) / len(differences) * 1e6,
                                    1)
    return row


def _stream_rate(rate, bitrate, size, family):
    """(packets a second, payload bytes) from any two of rate, bitrate, size.

    The bitrate counts UDP payload bits, as iperf3 does.  Raises ValueError
    with a sentence for the user.
    """
    largest = STREAM_MAX_SIZE.get(family, 65507)
    if rate and bitrate and size:
        raise ValueError("give at most two of --rate, --bitrate and --size")
    if rate and bitrate:
        # Derived, so never defaulted: 1k bits at 1000 pps is no datagram.
        size = int(round(bitrate / 8.0 / rate))
    elif not size:
        size = DEFAULT_STREAM_SIZE
    if not STREAM_MIN_SIZE <= size <= largest:
        raise ValueError("a datagram of %d bytes: the udp test needs %d to %d"
                         % (size, STREAM_MIN_SIZE, largest))
    if bitrate and not rate:
        rate = bitrate / 8.0 / size
    rate = rate or DEFAULT_STREAM_RATE
    return float(rate), size


def _stream_plan(rate, seconds, parallel):
    """The number of datagrams of a udp test; ValueError when it is more
    than STREAM_MAX_DATAGRAMS or fewer than one per flow."""
    if not seconds * rate < STREAM_MAX_DATAGRAMS + 0.5:    # inf and nan too
        raise ValueError("%g datagrams a second for %g s is above the udp "
                         "test's limit of %d datagrams" % (
                             rate, seconds, STREAM_MAX_DATAGRAMS))
    planned = int(round(seconds * rate))
    if planned < parallel:
        raise ValueError("%g datagrams a second for %g s is %d datagrams, "
                         "fewer than the %d flows" % (rate, seconds, planned,
                                                      parallel))
    return planned


class _UdpFlow(object):
    """One socket of the udp test (its own source port), and its tally."""

    def __init__(self, family, address, port, flow_id, index, share, size,
                 rtts):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.id = flow_id
        self.index = index
        self.tally = _StreamTally(share, rtts)
        self.payload = bytearray(size)
        self.errors = {}
        self.send_failed = 0
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                 _STREAM_RECEIVE_BUFFER)
        except OSError:
            pass                        # the default, then
        self.sock.setblocking(False)
        try:
            self.sock.connect(_endpoint(address, port))
        except OSError:                 # a broadcast address: EACCES
            self.sock.close()
            raise

    def note_error(self, error):
        kind = ("refused" if isinstance(error, ConnectionRefusedError)
                else error.strerror or str(error))
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def send_next(self, now):
        """Send the flow's next datagram; False if the socket buffer is full.

        A send that fails (a local firewall's EPERM, ENOBUFS, an earlier
        ICMP error) uses up its sequence number: that datagram is sent and
        lost, so the loss shows and the schedule goes on."""
        _STREAM_HEADER.pack_into(self.payload, 0, _STREAM_MAGIC, self.id,
                                 self.tally.sent, now)
        try:
            self.sock.send(self.payload)
        except (BlockingIOError, InterruptedError):
            return False                # the socket buffer is full
        except OSError as error:
            # An earlier ICMP error reported on this send (Linux), ENOBUFS,
            # or a local firewall's EPERM: this datagram did not leave.
            self.note_error(error)
            self.send_failed += 1
        self.tally.sent += 1
        return True

    def read_replies(self, buffer, clock):
        size = len(self.payload)
        for _ in range(_STREAM_BATCH):
            try:
                count = self.sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:    # an ICMP error, reported here
                self.note_error(error)
                return
            arrived = clock()
            parsed = parse_stream_datagram(buffer[:count]) \
                if count == size else None
            if parsed is None or parsed[0] != self.id:
                self.tally.foreign += 1
            else:
                self.tally.arrived(parsed[1], arrived - parsed[2])


def _udp_rows(flows, rate, size, seconds, wait, send_lag):
    """A row per flow when there are several, then the total."""
    parallel = len(flows)
    groups = [([flow], flow.index + 1) for flow in flows] \
        if parallel > 1 else []
    groups.append((flows, "total"))
    achieved = sum(flow.tally.sent for flow in flows) / seconds
    rows = []
    for members, name in groups:
        figures = _stream_figures([flow.tally for flow in members], wait)
        errors = {}
        send_failed = sum(flow.send_failed for flow in members)
        for flow in members:
            for kind, count in flow.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        row = {"test": "udp", "transport": "udp", "flow": name,
               "unit": "% loss", "value": figures["loss_pct"]}
        row.update(figures)
        row.update({
            "size_bytes": size,
            "rate_asked_pps": round(rate * len(members) / parallel, 1),
            "rate_sent_pps": round(figures["sent"] / seconds, 1),
            "bitrate_sent_bps": int(figures["sent"] * size * 8 / seconds),
            "parallel": parallel,
            "send_failed": send_failed,
            # The sender as a whole fell behind: the figures describe the
            # client, not the path.  Not when sends failed: then the errors
            # name the limit.
            "client_limited": achieved < rate * _STREAM_CATCH_UP and
                              not any(flow.send_failed for flow in flows),
            "send_lag_max_ms": round(send_lag * 1e3, 3),
            "errors": errors})
        rows.append(row)
    return rows


def _measure_udp(family, address, ports, seconds, parallel, progress,
                 timeout, rate=DEFAULT_STREAM_RATE, size=DEFAULT_STREAM_SIZE):
    """A paced stream of sequence-numbered datagrams over `parallel` flows.

    The schedule is by absolute time: datagram g is due at start + g/rate
    and goes out on flow g mod N.  Each wake sends everything due (in a
    batch when behind), then select() sleeps until the next one is due or a
    reply comes.  A reply more than `timeout` after its send is late; after
    the last send, replies are awaited for 2 * `timeout`, so that the last
    datagram, like every other, has `timeout` more to show as late.
    """
    planned = _stream_plan(rate, seconds, parallel)
    clock = time.perf_counter
    base_id = struct.unpack("!I", os.urandom(4))[0]
    buffer = bytearray(65536)
    # Every flow's RTTs in arrival order, for --interval rows only.
    rtts = [] if progress.interval else None
    flows = []
    selector = SELECTORS[0]()
    try:
        for index in range(parallel):
            flows.append(_UdpFlow(family, address, ports["echo"],
                                  (base_id + index) & 0xFFFFFFFF, index,
                                  len(range(index, planned, parallel)), size,
                                  rtts))
            selector.register(flows[-1].sock, EVENT_READ, flows[-1])

        def read_ready(wait):
            for key, _ in selector.select(max(0.0, min(
                    wait, progress.wake(time.monotonic())))):
                key.data.read_replies(buffer, clock)
            progress.tick()

        progress.begin("udp", "udp", lambda: {
            "sent": sum(flow.tally.sent for flow in flows),
            "received": sum(flow.tally.arrivals for flow in flows),
            "rtts": rtts})
        sent = 0
        send_lag = 0.0
        started = clock()
        end = started + seconds
        while True:
            now = clock()
            due = min(planned, int((now - started) * rate) + 1)
            if due > sent:
                send_lag = max(send_lag, now - (started + sent / rate))
            blocked = False
            for _ in range(min(due - sent, _STREAM_BATCH)):
                if not flows[sent % parallel].send_next(clock()):
                    blocked = True
                    break
                sent += 1
            if sent >= planned or now >= end:
                break
            # Sleep until the next one is due; when the kernel took none,
            # give it a moment.
            read_ready(0.0005 if blocked else
                       started + sent / rate - clock())
            progress.show("udp: %d sent" % sent)
        last_send = clock()
        send_seconds = seconds if sent >= planned else last_send - started
        # Replies still on their way: wait for them, at most 2 * `timeout`
        # (late ones too, whatever their place in the stream).
        deadline = last_send + 2 * timeout
        while any(flow.tally.arrivals + flow.send_failed < flow.tally.sent
                  for flow in flows) \
                and clock() < deadline:
            read_ready(deadline - clock())
    finally:
        for flow in flows:
            flow.sock.close()
        selector.close()
    return _udp_rows(flows, rate, size, send_seconds, timeout, send_lag)


# -- loaded: latency under load --

_LOADED_PING_SPACING = 0.01     # at most 100 round trips a second a transport


class _Pinger(object):
    """Echo round trips one at a time, over TCP or UDP, inside a loop.

    Each ping is a udp-test payload (its sequence number and send time);
    the next leaves once the reply is in and _LOADED_PING_SPACING has passed.
    A UDP ping unanswered within `patience` counts as lost.  Samples go to
    the list that `phase` names.
    """

    def __init__(self, transport, sock, patience):
        self.transport = transport
        self.sock = sock
        self.patience = patience
        self.sequence = 0
        self.waiting = False
        self.sent_at = 0.0
        self.next_send = 0.0
        self.received = bytearray()
        self.samples = {"idle": [], "loaded": []}
        self.history = []               # every RTT, ramp too: --interval
        self.lost = {"idle": 0, "loaded": 0}
        self.phase = "idle"

    def due(self, now):
        if self.waiting and self.transport == "udp":
            return self.sent_at + self.patience
        return None if self.waiting else self.next_send

    def on_timer(self, now):
        if self.waiting:                # UDP only: this one is lost
            self.lost[self.phase] += 1
            self.waiting = False
        if now >= self.next_send:
            self.sequence += 1
            self.sent_at = now
            self.next_send = now + _LOADED_PING_SPACING
            try:
                self.sock.send(stream_datagram(0, self.sequence, now, 32))
            except (BlockingIOError, InterruptedError):
                return                  # TCP: 32 bytes always fit, UDP: retry
            except OSError:
                if self.transport == "tcp":
                    raise
                return
            self.waiting = True

    def on_readable(self, now, buffer):
        try:
            count = self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            if self.transport == "tcp":
                raise
            return
        if self.transport == "tcp":
            if not count:
                raise ServerError("echo closed the connection")
            self.received += buffer[:count]
            if len(self.received) < 32:
                return
            reply, self.received = bytes(self.received[:32]), \
                self.received[32:]
        else:
            reply = bytes(buffer[:count])
        parsed = parse_stream_datagram(reply)
        if parsed is None or (self.transport == "tcp" and
                              parsed[1] != self.sequence):
            raise ServerError("echo returned %r" % reply[:40])
        if self.waiting and parsed[1] == self.sequence:
            self.samples[self.phase].append(now - self.sent_at)
            self.history.append(now - self.sent_at)
            self.waiting = False
        # A UDP reply to an earlier, lost ping: already counted.


def _open_load(family, address, ports, parallel, timeout, selector, load):
    """N chargen downloads and N discard uploads, registered, in `load`.

    Returns None, or the reason one could not be opened, naming its service
    and port (the row's own port is echo's)."""
    for _ in range(parallel):
        for kind, service in (("download", "chargen"), ("upload", "discard")):
            try:
                sock = _connect(family, address, ports[service], timeout)
            except OSError as error:
                return "the %s stream: %s port %d: %s" % (
                    kind, service, ports[service], _socket_error(error))
            sock.setblocking(False)
            load.append([sock, kind, 0])
            selector.register(sock, EVENT_READ if kind == "download"
                              else EVENT_WRITE, load[-1])


def _move_load(entry, buffer, block):
    """One read or write of a load stream; False once it has ended."""
    try:
        if entry[1] == "download":
            count = entry[0].recv_into(buffer)
            if not count:
                return False
        else:
            count = entry[0].send(block)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    entry[2] += count
    return True


def _measure_loaded(family, address, ports, seconds, parallel, progress,
                    timeout):
    """Echo RTT over TCP and UDP, idle, then with chargen downloads and
    discard uploads saturating both directions (half the time each, and
    up to `timeout` more until each transport has had a round trip)."""
    clock = time.perf_counter
    selector = SELECTORS[0]()
    load = []                   # [socket, "download" | "upload", bytes]
    buffer = bytearray(CHARGEN_CHUNK)
    block = memoryview(bytes(CHARGEN_CHUNK))
    tcp = _connect(family, address, ports["echo"], timeout)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    pingers = []
    load_error = None
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        udp.connect(_endpoint(address, ports["echo"]))
        for transport, sock in (("tcp", tcp), ("udp", udp)):
            sock.setblocking(False)
            pinger = _Pinger(transport, sock, min(timeout, 1.0))
            pingers.append(pinger)
            selector.register(sock, EVENT_READ, pinger)
        phase_seconds = seconds / 2.0
        # Queues take a moment to fill: the first quarter of the loaded
        # phase (at most a second) is not sampled.
        ramp = min(1.0, phase_seconds / 4.0)
        state = {"phase": "idle", "end": clock() + phase_seconds}
        load_started = None
        progress.begin("loaded", "tcp", lambda: {
            "phase": state["phase"],
            "bytes": sum(entry[2] for entry in load),
            "rtts": pingers[0].history})

        def phase_over(now):
            # A phase that has not yet a round trip of each transport goes
            # on, for up to `timeout` more: without one it says nothing.
            if now < state["end"]:
                return False
            return state["phase"] == "ramp" or now >= state["end"] + \
                timeout or all(p.samples[state["phase"]] for p in pingers)

        while True:
            now = clock()
            if phase_over(now):
                if state["phase"] == "loaded":
                    break
                if state["phase"] == "idle":    # load both directions
                    load_started = now
                    load_error = _open_load(family, address, ports, parallel,
                                            timeout, selector, load)
                    if load_error:
                        break           # the idle figures are kept
                    state.update(phase="ramp", end=now + ramp)
                else:
                    state.update(phase="loaded",
                                 end=now + phase_seconds - ramp)
            for pinger in pingers:
                # Ramp-up samples are kept apart, and never reported.
                pinger.phase = "idle" if state["phase"] == "idle" \
                    else "loaded"
                if state["phase"] == "ramp":
                    pinger.samples["loaded"] = []
                    pinger.lost["loaded"] = 0
                due = pinger.due(now)
                if due is not None and now >= due:
                    pinger.on_timer(now)
            end = state["end"]
            wake = min([end if now < end else end + timeout] +
                       [d for d in (p.due(now) for p in pingers)
                        if d is not None])
            for key, _ in selector.select(max(0.0, min(
                    wake - clock(), progress.wake(time.monotonic())))):
                if isinstance(key.data, _Pinger):
                    key.data.on_readable(clock(), buffer)
                elif not _move_load(key.data, buffer, block):
                    selector.unregister(key.fileobj)
            progress.tick()
            progress.show("loaded: %s" % state["phase"])
        load_seconds = max(1e-6, clock() - load_started)
    finally:
        for entry in load:
            entry[0].close()
        tcp.close()
        udp.close()
        selector.close()
    rates = {}
    for kind in ("download", "upload"):
        moved = sum(entry[2] for entry in load if entry[1] == kind)
        rates[kind + "_mbyte_per_s"] = round(moved / 1e6 / load_seconds, 2)
    rows = [_loaded_row(pinger, rates, parallel) for pinger in pingers]
    if load_error:
        for row in rows:
            row["error"] = load_error
    return rows


def _loaded_row(pinger, rates, parallel):
    """One transport's idle and loaded figures side by side (arithmetic)."""
    row = {"test": "loaded", "transport": pinger.transport, "unit": "µs"}
    figures = {}
    for phase in ("idle", "loaded"):
        samples = pinger.samples[phase]
        figures[phase] = _percentiles(samples)
        row[phase + "_count"] = len(samples)
        for key, value in figures[phase].items():
            row[phase + "_" + key] = value
        if pinger.transport == "udp":
            tries = len(samples) + pinger.lost[phase]
            row[phase + "_loss_pct"] = round(
                100.0 * pinger.lost[phase] / tries, 2) if tries else 0.0
    # No loaded round trip: no figure (None, '-' in the table).
    row["value"] = figures["loaded"].get("p50_us")
    if figures["idle"] and figures["loaded"]:
        for key in ("p50_us", "p90_us", "p99_us"):
            row["increase_" + key] = round(figures["loaded"][key] -
                                           figures["idle"][key], 1)
    row.update(rates)
    row["parallel"] = parallel
    return row


# -- mtu: the largest datagram that crosses the path, and how bigger ones fail --

# Forbidding fragmentation.  Linux: IP_MTU_DISCOVER / IPV6_MTU_DISCOVER set to
# "probe" (send with DF, ignore the learned path MTU: each size tests the path
# itself) and IP_MTU / IPV6_MTU to read the MTU the kernel holds for a
# connected socket.  Python before 3.x lacks some of these names on Linux: the
# numbers are Linux's <linux/in.h> and <linux/in6.h>.  Elsewhere (BSDs, macOS)
# IP_DONTFRAG / IPV6_DONTFRAG, where Python has them.
if _ON_LINUX:
    _IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
    _IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
    _IP_PMTUDISC_PROBE = getattr(socket, "IP_PMTUDISC_PROBE", 3)
    _IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
    _IPV6_PMTUDISC_DONT = getattr(socket, "IPV6_PMTUDISC_DONT", 0)
    _IPV6_PMTUDISC_PROBE = getattr(socket, "IPV6_PMTUDISC_PROBE", 3)
    _IP_MTU = getattr(socket, "IP_MTU", 14)
    _IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
_IP_DONTFRAG = getattr(socket, "IP_DONTFRAG", None)
_IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62 if _ON_LINUX else None)
# IPv4 (20) or IPv6 (40) header, and UDP's 8 bytes.
_UDP_OVERHEAD = {socket.AF_INET: 28, socket.AF_INET6: 48}
_MTU_TRIES = 3                  # sends of one size before it counts as lost


def _set_fragmentation(sock, family, allowed):
    """Allow or forbid fragmentation of what sock sends; False if this
    platform offers no way to forbid it."""
    v6 = family == socket.AF_INET6
    level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
    try:
        if _ON_LINUX:
            if v6:
                sock.setsockopt(level, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DONT
                                if allowed else _IPV6_PMTUDISC_PROBE)
            else:
                sock.setsockopt(level, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT
                                if allowed else _IP_PMTUDISC_PROBE)
            return True
        option = _IPV6_DONTFRAG if v6 else _IP_DONTFRAG
        if option is None:
            return False
        sock.setsockopt(level, option, 0 if allowed else 1)
        return True
    except OSError:
        return False


def _kernel_mtu(sock, family):
    """The path MTU the kernel holds for a connected socket (Linux), or None."""
    if not _ON_LINUX:
        return None
    try:
        if family == socket.AF_INET6:
            return sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)
        return sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
    except OSError:
        return None


def _mtu_search(attempt, smallest, largest):
    """Binary search for the largest size that attempt() gets through.

    attempt(size) returns ("ok", None), ("lost", None), ("filtered", None)
    (a local firewall refused the send) or ("refused", fits):
    the local host refused the size and `fits` is the largest size its MTU
    allows (or None): every size above it fails the same way, and it is
    tried next.  The smallest lost size is tried once more before it is
    believed: a reply held up past the timeout on a busy host would
    otherwise end the search low.  Returns (largest that passed or None,
    smallest that failed or None, how it failed, sizes tried in order).
    """
    passed = None
    failures = {}                       # highest size still possible: (size, how)
    confirmed = set()
    low, high = smallest, largest
    size = largest                      # most paths: one try says "no limit"
    tried = []
    while True:
        while low <= high:
            tried.append(size)
            outcome, fits = attempt(size)
            if outcome == "ok":
                passed, low = size, size + 1
            elif outcome == "refused" and fits is not None and \
                    low <= fits < size:
                high = fits
                failures[high] = (fits + 1, outcome)
            else:
                high = size - 1
                failures[high] = (size, outcome)
            size = high if high == fits else (low + high + 1) // 2
        if not failures:
            break
        failed, failure = failures[min(failures)]
        if failure != "lost" or failed in confirmed:
            break
        confirmed.add(failed)
        tried.append(failed)
        if attempt(failed)[0] != "ok":
            break
        passed = failed                 # it was late, not lost: search on
        del failures[min(failures)]
        low, high = failed + 1, min(failures) if failures else largest
        size = (low + high + 1) // 2
    failed, failure = failures[min(failures)] if failures else (None, None)
    return passed, failed, failure, tried


def _fragment_probe_size(failed, kernel_mtu, overhead, largest):
    """The size that asks whether fragmented datagrams get through: at
    least the first failing size, and big enough that this host itself
    must fragment it.  None when no datagram is that big (loopback's MTU
    of 65,536 holds the largest): nothing would be fragmented, so a loss
    would say nothing about fragments."""
    size = min(largest, max(failed, (kernel_mtu or 0) - overhead + 1))
    if kernel_mtu and size + overhead <= kernel_mtu:
        return None
    return size


def _mtu_verdict(passed, failed, failure, kernel_mtu, overhead,
                 fragmented, forbidden, fragmented_size=None,
                 truncated_to=None):
    """The mtu row's named outcome and sentence (pure, for the tests)."""
    row = {"fragmented": fragmented, "fragmentation_forbidden": forbidden}
    if passed is not None:
        row["largest_payload_bytes"] = passed
    if passed is None and failure == "filtered":
        row["limit"] = "local-filter"
        text = "this host's firewall refused every send (EPERM), even of " \
            "%d bytes" % (failed or 0)
    elif passed is None:
        row["limit"] = "nothing-back"
        text = "no datagram came back, even of %d bytes" % (failed or 0)
    else:
        row["path_mtu_bytes"] = passed + overhead
        text = "%d-byte payloads (%d-byte packets) get through" % (
            passed, passed + overhead)
    if passed is None:
        pass
    elif failed is None:
        row["limit"] = "none"
        text += ": the largest UDP datagram crosses this path"
    elif failure == "filtered":
        row["limit"] = "local-filter"
        text += "; %d bytes and more are refused by this host's firewall " \
                "(EPERM or EACCES on send)" % failed
    elif failure == "refused":
        row["limit"] = "local-mtu"
        if kernel_mtu:
            row["limit_mtu_bytes"] = kernel_mtu
        text += "; %d bytes and more are refused by this host (EMSGSIZE): " \
                "its MTU on this route is %s" % (failed, kernel_mtu or "unknown")
    elif kernel_mtu and kernel_mtu < failed + overhead:
        row["limit"] = "icmp-too-big"
        row["limit_mtu_bytes"] = kernel_mtu
        text += "; %d bytes and more are too big for a hop, which said so " \
                "(ICMP fragmentation needed / packet too big): next-hop MTU " \
                "%d" % (failed, kernel_mtu)
    else:
        row["limit"] = "black-hole"
        text += "; %d bytes and more vanish without an ICMP error: a path " \
                "MTU black hole" % failed
    if not forbidden:
        text += " (this platform cannot forbid fragmentation: sizes are " \
                "what came back, fragmented or not)"
    if fragmented != "untested":
        row["fragmented_size_bytes"] = fragmented_size
        text += "; allowed to fragment, %d bytes %s" % (
            fragmented_size, "come back" if fragmented == "passes"
            else "are lost too")
    if truncated_to:
        row["echo_truncates_to_bytes"] = truncated_to
        text += "; the echo server returns at most %d bytes of a datagram, " \
                "so larger ones were seen to arrive (a shorter copy came " \
                "back), not to come back whole" % truncated_to
    return row, text


class _MtuProbe(object):
    """One UDP echo socket of the mtu test, with fragmentation forbidden or
    allowed, and its own selector: attempt(size) says what came of a size.
    """

    def __init__(self, family, address, port, allowed, timeout, progress,
                 token):
        self.family = family
        self.overhead = _UDP_OVERHEAD.get(family, 28)
        self.timeout = timeout
        self.progress = progress
        self.token = token
        self.sizes = 0
        self.largest = 0                # the largest size that came back
        self.refused = False            # an ICMP port unreachable came
        self.truncated_to = None        # a shorter copy came back
        self.buffer = bytearray(65536)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.selector = SELECTORS[0]()
        try:
            self.settable = _set_fragmentation(self.sock, family, allowed)
            self.sock.setblocking(False)
            self.sock.connect(_endpoint(address, port))
            self.selector.register(self.sock, EVENT_READ)
        except OSError:
            self.close()
            raise

    def attempt(self, size):
        outcome = self._attempt(size)
        self.sizes += 1
        if outcome[0] == "ok":
            self.largest = max(self.largest, size)
        self.progress.tick()
        self.progress.show("mtu: %d bytes %s" % (size, outcome[0]))
        return outcome

    def _attempt(self, size):
        """Up to _MTU_TRIES sends of `size`, spread over the timeout."""
        clock = time.perf_counter
        payload = bytearray(size)
        deadline = clock() + self.timeout
        for _ in range(_MTU_TRIES):
            # Each try with its own send time: no two datagrams alike, so
            # a server's loop watch never takes a retry for its own reply.
            _STREAM_HEADER.pack_into(payload, 0, _STREAM_MAGIC, self.token,
                                     size, clock())
            try:
                self.sock.send(payload)
            except OSError as error:
                if error.errno == errno.EMSGSIZE:
                    mtu = _kernel_mtu(self.sock, self.family)
                    return "refused", mtu - self.overhead if mtu else None
                if error.errno in (errno.EPERM, errno.EACCES):
                    # A local firewall (an nftables or iptables drop in the
                    # output chain) took this size: an outcome, and the
                    # search goes on below it.
                    return "filtered", None
                if not isinstance(error, (BlockingIOError,
                                          ConnectionRefusedError)):
                    raise
            try_end = min(deadline, clock() + self.timeout / _MTU_TRIES)
            while clock() < try_end:
                if self._reply_came(size, try_end - clock()):
                    return "ok", None
                if self.refused:
                    return "lost", None     # nothing listens: no use waiting
        return "lost", None

    def _reply_came(self, size, wait):
        if not self.selector.select(min(wait, self.progress.wake(
                time.monotonic()))):
            self.progress.tick()
            return False
        try:
            count = self.sock.recv_into(self.buffer)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionRefusedError:
            self.refused = True
            return False
        reply = parse_stream_datagram(self.buffer[:count])
        if not reply or reply[:2] != (self.token, size):
            return False                # a late reply to an earlier size
        if count < size:
            # A shorter copy (xinetd keeps 2,048 bytes): the datagram
            # crossed the path; the server's buffer cut it.
            self.truncated_to = min(count, self.truncated_to or count)
        return True

    def close(self):
        self.selector.close()
        self.sock.close()


def _measure_mtu(family, address, ports, progress, timeout):
    """Search the largest UDP echo payload that comes back unfragmented."""
    largest = STREAM_MAX_SIZE.get(family, 65507)
    overhead = _UDP_OVERHEAD.get(family, 28)
    token = struct.unpack("!I", os.urandom(4))[0]
    probes = []
    progress.begin("mtu", "udp", lambda: {
        "sizes": sum(probe.sizes for probe in probes),
        "payload_bytes": max([probe.largest for probe in probes] or [0])})
    try:
        probes.append(_MtuProbe(family, address, ports["echo"], False,
                                timeout, progress, token))
        strict = probes[0]
        passed, failed, failure, tried = _mtu_search(
            strict.attempt, STREAM_MIN_SIZE, largest)
        kernel_mtu = _kernel_mtu(strict.sock, family)
        fragmented, fragmented_size = "untested", None
        if failed is not None and passed is not None and strict.settable:
            fragmented_size = _fragment_probe_size(failed, kernel_mtu,
                                                   overhead, largest)
        if fragmented_size is not None:
            probes.append(_MtuProbe(family, address, ports["echo"], True,
                                    timeout, progress, token))
            outcome, _ = probes[1].attempt(fragmented_size)
            fragmented = "passes" if outcome == "ok" else "lost"
    finally:
        for probe in probes:
            probe.close()
    row, detail = _mtu_verdict(
        passed, failed, failure, kernel_mtu, overhead, fragmented,
        strict.settable, fragmented_size,
        min([probe.truncated_to for probe in probes if probe.truncated_to]
            or [None]))
    result = {"test": "mtu", "transport": "udp", "unit": "bytes",
              "value": row.get("largest_payload_bytes")}
    result.update(row)
    if row["limit"] == "nothing-back" and strict.refused:
        detail += " (an ICMP port unreachable: nothing listens there)"
    result.update({"sizes_tried": tried, "detail": detail})
    return [result]


def measure(host, tests=None, seconds=5.0, parallel=1, port_offset=0,
            ports=None, family=None, timeout=DEFAULT_PROBE_TIMEOUT,
            connect_service="daytime", progress=False, rate=None,
            bitrate=None, size=None, interval=None, report=None):
    """Measure the path to HOST's echo, chargen, discard and daytime.

    tests: any of MEASURE_TESTS (default: DEFAULT_MEASURE_TESTS, the first
    five).  Returns a list of dicts: host, test, transport, address, port,
    unit, value, and the test's own figures (percentiles in µs, bytes,
    errors...).  A content error (a wrong chargen or echo byte) is counted
    in wrong_bytes.  A figure that has no value (no round trip completed)
    is None.  A test that a socket error stopped fails alone: its row has
    only test, transport, host, address, port, value None and error (the
    reason), and the next test runs.  _measure_failures(rows) says what
    failed, if anything did.  udp: rate (datagrams a second, all flows
    together), bitrate (payload bits a second) and size (payload bytes),
    any two (ValueError if they cannot be, or if round(rate * seconds) is
    above STREAM_MAX_DATAGRAMS or below parallel).  interval: report(row) gets a
    row every `interval` seconds during each test ("type": "interval"),
    and each test's rows as it ends.
    """
    _require_duration("seconds", seconds)
    _require_duration("timeout", timeout)
    tests = [name for name in MEASURE_TESTS if name in (tests or
                                                       DEFAULT_MEASURE_TESTS)]
    target_family, address = _resolve_targets(host, family)[0]
    shown = _shown_address(address)
    if "udp" in tests:
        rate, size = _stream_rate(rate, bitrate, size, target_family)
        _stream_plan(rate, seconds, parallel)   # a ValueError before any test
    all_ports = dict((name, _service_port(name, port_offset, ports))
                     for name in SERVICE_NAMES)
    context = {"host": host, "address": shown}

    def emit(row):
        row.update(context)
        row["port"] = all_ports[_MEASURE_SERVICE.get(row["test"],
                                                     connect_service)]
        if report is not None:
            report(row)

    status = _Progress(progress, interval, emit)
    rows = []
    try:
        for test in tests:
            try:
                found = _measure_one(test, target_family, address, all_ports,
                                     seconds, parallel, status, timeout,
                                     connect_service, rate, size)
            except (OSError, ServerError) as error:
                # This test alone: the rows of the others are kept.
                found = [{"test": test, "transport": _MEASURE_TRANSPORT.get(
                              test, "tcp"), "value": None,
                          "error": _socket_error(error)
                          if isinstance(error, OSError) else str(error)}]
            status.finish()
            for row in found:
                emit(row)
            rows.extend(found)
    finally:
        status.clear()
    return rows


def _measure_one(test, family, address, ports, seconds, parallel, progress,
                 timeout, connect_service, rate=None, size=None):
    """The rows of one measure test (one function each)."""
    if test == "latency":
        return _measure_latency(family, address, ports, seconds, progress,
                                timeout)
    if test == "download":
        return _measure_download(family, address, ports, seconds, parallel,
                                 progress, timeout)
    if test == "upload":
        return _measure_upload(family, address, ports, seconds, parallel,
                               progress, timeout)
    if test == "echo":
        return _measure_echo(family, address, ports, seconds, progress,
                             timeout)
    if test == "udp":
        return _measure_udp(family, address, ports, seconds, parallel,
                            progress, timeout, rate, size)
    if test == "loaded":
        return _measure_loaded(family, address, ports, seconds, parallel,
                               progress, timeout)
    if test == "mtu":
        return _measure_mtu(family, address, ports, progress, timeout)
    return _measure_connect(family, address, ports, seconds, parallel,
                            progress, timeout, connect_service)


def _measure_row_failures(row):
    """What failed in one measure row, in words: [] when nothing did.

    The exit status of 'diagsvc measure' is 1 exactly when some row has a
    reason here; a new test adds its own checks below.
    """
    test = row["test"]
    reasons = []
    if "error" in row:
        reasons.append(row["error"])
        if "unit" not in row:           # stopped before it had any figure
            return reasons
    if test == "latency" and not row["count"] and "error" not in row:
        reasons.append("no round trip completed")
    if row.get("wrong_replies"):
        reasons.append("%d replies were not the ping's echo"
                       % row["wrong_replies"])
    if test in ("download", "upload", "echo") and not row["bytes"]:
        reasons.append("no bytes got through")
    if row.get("ended_early"):
        connections = row.get("parallel", 1)
        reasons.append("%s: %s at %.2f s" % (
            "the connection ended early" if connections == 1 else
            "%d of %d connections ended early; the first" % (
                row["ended_early"], connections),
            row["ended_how"], row["ended_at_s"]))
    if row.get("wrong_bytes"):
        reasons.append("%d wrong bytes" % row["wrong_bytes"])
    if row.get("missing_bytes"):
        reasons.append("%d bytes never echoed" % row["missing_bytes"])
    if row.get("returned_bytes"):
        reasons.append("discard sent %d bytes back" % row["returned_bytes"])
    if test == "upload" and not row["drained"] and \
            row["ended_early"] < row["parallel"]:
        reasons.append("not drained: the server did not close after our "
                       "half-close")
    if test == "connect" and not row["count"]:
        reasons.append("no connection succeeded")
    if test == "udp" and not row["received"]:
        reasons.append("no datagram came back")
    if test == "loaded" and not (row["idle_count"] and row["loaded_count"]):
        reasons.append("no round trip in the %s phase" % (
            "idle" if not row["idle_count"] else "loaded"))
    if test == "mtu" and row["limit"] == "nothing-back":
        reasons.append("no datagram came back")
    return reasons


def _measure_failures(rows):
    """Every failure in a measure run, as 'test/transport: reason'."""
    return ["%s/%s: %s" % (row["test"], row["transport"], reason)
            for row in rows for reason in _measure_row_failures(row)]


# --- The command line --------------------------------------------------------


def _port_assignment(text):
    name, separator, port = text.partition("=")
    if not separator or name not in SERVICES or not port.isdigit() or \
            int(port) > 65535:
        import argparse
        raise argparse.ArgumentTypeError(
            "%r: give SERVICE=PORT, e.g. echo=7007 (0 for any free port); "
            "services: %s" % (text, ", ".join(SERVICE_NAMES)))
    return name, int(port)


def _bitrate(text):
    """'10M' -> 10e6: k, M and G are SI powers of 1000."""
    import argparse
    scale = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}
    number = text[:-1] if text[-1:] in scale else text
    try:
        value = float(number) * scale.get(text[-1:], 1.0)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("%r is not a bitrate such as 10M, "
                                         "500k or 64000" % text)
    return value


def _non_negative(kind):
    def convert(text):
        import argparse
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if value < 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError("%r is not a number >= 0" % text)
        return value
    return convert


def _positive(kind):
    """A duration or a timeout: a finite number above 0 (with 0, nothing
    would be waited for; with nan, no deadline would ever come)."""
    def convert(text):
        import argparse
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError("%r is not a number > 0" % text)
        return value
    return convert


def _parse_mixed(parser, argv, rest):
    """parse_args(argv), with options and positionals in any order.

    argparse fills the positionals from their first run and calls a later
    one unrecognized ('probe HOST --tcp echo'); parse_intermixed_args, which
    mends that, is Python 3.7+.  So parse what argparse knows, refuse any
    leftover option, and give the leftover words to REST, the positional
    that takes any number of them (each of diagsvc's parsers has one).
    """
    options, leftover = parser.parse_known_args(argv)
    unknown = [word for word in leftover if word.startswith("-")]
    if unknown:
        parser.error("unrecognized arguments: %s" % " ".join(unknown))
    if leftover:
        setattr(options, rest, list(getattr(options, rest) or ()) + leftover)
    return options


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text):
    """Seconds in '90s', '30m', '2h', '1h30m', '2m30s' or plain seconds
    ('1.5'); ValueError for anything else or for a duration that is not
    above 0."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        # NUMBER UNIT parts, each unit at most once, largest first.
        seconds, rest = 0.0, text
        for unit in "hms":
            if unit in rest:
                number, rest = rest.split(unit, 1)
                if not number.replace(".", "", 1).isdigit():
                    rest = "not a number"
                    break
                seconds += float(number) * _DURATION_UNITS[unit]
        if rest or not text:
            seconds = -1.0
    if not 0 < seconds <= LIMIT_MAX:    # nan, inf: no end that can be dated
        raise ValueError("%r is not a duration: give e.g. 90s, 30m, 2h, "
                         "1h30m or seconds (up to %d)" % (text, LIMIT_MAX))
    return seconds


def _duration(text):
    import argparse
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


# sd_listen_fds(3): passed descriptors start at 3, in LISTEN_FDNAMES' order.
SD_LISTEN_FDS_START = 3
_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _listen_fds(environ, pid):
    """[(descriptor, name or None)] that systemd passed to process ``pid``.

    The sd_listen_fds(3) contract: nothing unless LISTEN_PID is this
    process (a child that inherited the variables must not take the
    sockets); LISTEN_FDS descriptors from 3 on; LISTEN_FDNAMES, when set,
    one name each, colon-separated.  Malformed values raise ServerError.
    """
    if environ.get("LISTEN_PID", "").strip() != str(pid):
        return []
    count = environ.get("LISTEN_FDS", "").strip()
    if not count.isdigit():
        raise ServerError("LISTEN_FDS=%r is not a number of descriptors"
                          % (count,))
    count = int(count)
    names = environ.get("LISTEN_FDNAMES")
    names = names.split(":") if names is not None else [""] * count
    if len(names) != count:
        raise ServerError("LISTEN_FDNAMES has %d names for LISTEN_FDS=%d "
                          "descriptors" % (len(names), count))
    return [(SD_LISTEN_FDS_START + index, names[index] or None)
            for index in range(count)]


def _not_a_socket_text(descriptor, error):
    """The one line for a passed descriptor the kernel would not treat as
    a socket, chosen by errno (strerror's wording differs by platform)."""
    if error.errno == errno.EBADF:
        what = "is not open"
    elif error.errno == errno.ENOTSOCK:
        what = "is not a socket"
    else:
        what = "cannot be used: %s" % (error.strerror or error)
    return "descriptor %d was passed as a socket but %s" % (descriptor, what)


def _inherited_socket(descriptor):
    """A socket object for a passed descriptor, of the family and type the
    kernel says it has (before 3.7, socket(fileno=) did not ask)."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0,
                             descriptor)
    except OSError as error:
        # 3.7+ asks the kernel here, 3.6 only below: one message for both.
        raise ServerError(_not_a_socket_text(descriptor, error))
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if hasattr(socket, "SO_DOMAIN"):
            family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        else:
            address = sock.getsockname()
            family = (socket.AF_INET6 if isinstance(address, tuple) and
                      len(address) == 4 else socket.AF_INET
                      if isinstance(address, tuple) else
                      getattr(socket, "AF_UNIX", socket.AF_INET))
    except OSError as error:
        sock.detach()                   # not ours to close: not a socket
        raise ServerError(_not_a_socket_text(descriptor, error))
    sock = socket.socket(family, kind, 0, sock.detach())
    sock.set_inheritable(False)         # a child must not hold it open
    return sock


def _take_passed_sockets(environ=None):
    """[(socket, name)] passed by systemd, or None; the variables are
    removed from the environment either way (sd_listen_fds(3) with
    unset_environment), so that nothing started later inherits them."""
    environ = os.environ if environ is None else environ
    try:
        passed = _listen_fds(environ, os.getpid())
    finally:
        for variable in _ACTIVATION_VARIABLES:
            environ.pop(variable, None)
    if not passed:
        return None
    sockets = []
    try:
        for descriptor, name in passed:
            sockets.append((_inherited_socket(descriptor), name))
    except ServerError:
        for sock, _ in sockets:
            sock.close()
        raise
    return sockets


def _duration_text(seconds):
    """90 -> '90 s', 1800 -> '30 min', 7200 -> '2 h', 1.5 -> '1.5 s',
    123456.7 -> '123456.7 s': whole seconds as they are, never '1e+09'."""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d %s" % (seconds // size, unit)
    if seconds == int(seconds):
        return "%d s" % seconds
    return "%.1f s" % seconds


def _build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="diagsvc",
        usage="%(prog)s [SERVICE ...] [options]\n"
              "       %(prog)s probe HOST [SERVICE ...] [options]   "
              "(see: %(prog)s probe --help)\n"
              "       %(prog)s measure HOST [TEST ...] [options]    "
              "(see: %(prog)s measure --help)",
        description="Serve echo (RFC 862), discard (863), chargen (864), "
                    "qotd (865), daytime (867) and time (868) over TCP and "
                    "UDP, IPv4 and IPv6.  'diagsvc probe HOST' and "
                    "'diagsvc measure HOST' are the client side.",
        epilog="Start lines on stdout: 'diagsvc: serving SERVICE/TRANSPORT "
               "on HOST port PORT'.  Log on stderr.  Under systemd it serves "
               "the sockets it is passed (LISTEN_FDS) and reports to "
               "NOTIFY_SOCKET; the README has unit files.")
    parser.add_argument("services", nargs="*", metavar="SERVICE",
                        help="services to serve (default: all): " +
                        ", ".join(SERVICE_NAMES))
    where = parser.add_argument_group("where")
    where.add_argument("--port-offset", type=_non_negative(int), default=0,
                       metavar="N", help="add N to every standard port "
                       "(10000 gives 10007, 10009, ...; no root needed)")
    where.add_argument("--port", action="append", type=_port_assignment,
                       default=[], metavar="SERVICE=PORT",
                       help="one service's port; 0 for any free port "
                       "(repeatable)")
    where.add_argument("--bind", action="append", default=[], metavar="ADDR",
                       help="an address or name to listen on (repeatable; "
                       "default: all IPv4 and IPv6 addresses)")
    transport = where.add_mutually_exclusive_group()
    transport.add_argument("--tcp", action="store_true", help="TCP only")
    transport.add_argument("--udp", action="store_true", help="UDP only")
    where.add_argument("--qotd-file", metavar="FILE",
                       help="quotes in fortune format (separated by lines "
                       "holding only %%)")

    limits = parser.add_argument_group("limits (see the README's Safety section)")
    limits.add_argument("--max-connections", type=_non_negative(int),
                        default=0, metavar="N", help="TCP connections at "
                        "once (default, or 0: the open-file limit less %d)" %
                        DESCRIPTOR_RESERVE)
    limits.add_argument("--max-per-source", type=_non_negative(int),
                        default=DEFAULT_MAX_PER_SOURCE, metavar="N",
                        help="TCP connections from one source (an IPv4 "
                        "address, an IPv6 /64; default "
                        "%(default)s; 0: no limit)")
    limits.add_argument("--idle-timeout", type=_non_negative(float),
                        default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
                        help="close a connection on which nothing moved "
                        "for this long (default %(default)s; 0: never)")
    limits.add_argument("--max-output", type=_non_negative(int),
                        default=DEFAULT_MAX_OUTPUT, metavar="BYTES",
                        help="bytes owed to one connection at most "
                        "(default %(default)s)")
    limits.add_argument("--udp-rate", type=_non_negative(float),
                        default=DEFAULT_UDP_RATE, metavar="PER_SECOND",
                        help="UDP replies a second per source for chargen, "
                        "qotd, daytime, time (default %(default)s; 0: no "
                        "limit)")
    limits.add_argument("--udp-burst", type=_non_negative(int),
                        default=DEFAULT_UDP_BURST, metavar="N",
                        help="... after a burst of N (default %(default)s)")
    limits.add_argument("--udp-echo-rate", type=_non_negative(float),
                        default=0.0, metavar="PER_SECOND",
                        help="UDP echo replies a second per source, after "
                        "a second's worth at once (default 0: no limit; it "
                        "ends echo loops with a foreign service that "
                        "answers with new bytes)")
    limits.add_argument("--ipv4-prefix", type=_non_negative(int),
                        default=DEFAULT_IPV4_PREFIX, metavar="BITS",
                        help="per-source limits count IPv4 sources by "
                        "network of this length (default %(default)s: by "
                        "address)")
    limits.add_argument("--ipv6-prefix", type=_non_negative(int),
                        default=DEFAULT_IPV6_PREFIX, metavar="BITS",
                        help="... and IPv6 sources (default %(default)s: a "
                        "/64 is one host's share)")
    limits.add_argument("--no-udp-guard", dest="udp_guard",
                        action="store_false", help="answer datagrams from "
                        "ports below 1024 and our own ports, from group "
                        "sources and to group destinations too, and do "
                        "not watch for loops (lab use: this is how "
                        "reflection loops start)")

    access = parser.add_argument_group("access and privileges")
    access.add_argument("--allow", action="append", default=[],
                        metavar="ADDR[/BITS]", help="serve only these "
                        "addresses or networks (repeatable)")
    access.add_argument("--deny", action="append", default=[],
                        metavar="ADDR[/BITS]", help="refuse these "
                        "(repeatable; deny wins over allow)")
    access.add_argument("--user", default="nobody", metavar="NAME",
                        help="started as root, become NAME once the sockets "
                        "are bound (default %(default)s; root keeps root)")

    other = parser.add_argument_group("other")
    other.add_argument("--for", dest="duration", type=_duration,
                       metavar="DURATION", help="serve for this long, then "
                       "close every socket and exit 0: 90s, 30m, 2h, or "
                       "seconds (default: until stopped)")
    other.add_argument("--selector", choices=[cls.__name__ for cls in SELECTORS],
                       help="the event loop's selector (default: %s)" %
                       SELECTORS[0].__name__)
    other.add_argument("--busy-poll", type=_non_negative(float),
                       default=None, metavar="MICROSECONDS",
                       help="poll for the next event this long at most "
                       "before sleeping, adapting to the traffic (default "
                       "%d on a host with two or more CPUs, else 0; 0: "
                       "never; README: Performance)" % (
                           DEFAULT_BUSY_POLL * 1e6))
    # For tests and comparisons: the portable UDP path on Linux too
    # (README: Performance).
    other.add_argument("--no-udp-batching", dest="udp_batching",
                       action="store_false", help=argparse.SUPPRESS)
    other.add_argument("-q", "--quiet", action="count", default=0,
                       help="errors only")
    other.add_argument("-v", "--verbose", action="count", default=0,
                       help="log every connection and datagram")
    other.add_argument("--version", action="version",
                       version="diagsvc " + __version__)
    return parser


def _busy_poll_seconds(microseconds):
    """--busy-poll in seconds.  By default only on a host with a CPU to
    spare: on one CPU, polling would hold back the very clients it waits
    for.  The host's count, not this process's affinity: a server pinned
    to one core (taskset) still has its clients run on the others."""
    if microseconds is None:
        return DEFAULT_BUSY_POLL if (os.cpu_count() or 1) > 1 else 0.0
    return microseconds / 1e6


def _serve_main(argv):
    parser = _build_parser()
    options = _parse_mixed(parser, argv, "services")
    for name in options.services:
        if name not in SERVICES:
            parser.error("unknown service %r (choose from %s)" % (
                name, ", ".join(SERVICE_NAMES)))
    if options.busy_poll is not None and options.busy_poll > 1e6:
        parser.error("--busy-poll must be 0 to 1,000,000 microseconds, "
                     "not {:,}".format(options.busy_poll))
    prog = "diagsvc"
    try:
        quotes = load_quotes(options.qotd_file) if options.qotd_file else None
        raise_open_file_limit()
        selector = None
        if options.selector:
            selector = getattr(selectors, options.selector)
        server = Server(
            options.services, bind=options.bind,
            port_offset=options.port_offset, ports=dict(options.port),
            transports=("tcp",) if options.tcp else ("udp",) if options.udp
            else TRANSPORTS,
            quotes=quotes, selector=selector,
            max_connections=options.max_connections,
            max_per_source=options.max_per_source,
            idle_timeout=options.idle_timeout,
            max_output=options.max_output, udp_guard=options.udp_guard,
            udp_rate=options.udp_rate, udp_burst=options.udp_burst,
            udp_echo_rate=options.udp_echo_rate,
            allow=options.allow, deny=options.deny,
            ipv4_prefix=options.ipv4_prefix, ipv6_prefix=options.ipv6_prefix,
            verbosity=max(0, 1 + options.verbose - options.quiet),
            udp_batching=options.udp_batching,
            sockets=_take_passed_sockets(), duration=options.duration,
            notifier=SystemdNotifier.from_environment(),
            busy_poll=_busy_poll_seconds(options.busy_poll))
    except (ServerError, QuoteFileError) as error:
        sys.stderr.write("%s: error: %s\n" % (prog, error))
        return 2
    with server:
        # Everything imported on demand must be imported before the drop:
        # the unprivileged user may not be able to read the interpreter's
        # own library (a pyenv under /root, say).
        import traceback  # noqa: F401  (used by _handler_failed)
        _install_signal_handlers(server)
        try:
            who = drop_privileges(options.user)
        except ServerError as error:
            sys.stderr.write("%s: error: %s\n" % (prog, error))
            return 2
        except OSError as error:
            sys.stderr.write("%s: error: cannot drop privileges to %s: %s\n"
                             % (prog, options.user, error))
            return 2
        for note in server.notes:
            sys.stderr.write("%s: note: %s\n" % (prog, note))
        lines = []
        for name in server.services:
            for transport in server.transports:
                for host, port in server.addresses[name, transport]:
                    lines.append("%s: serving %s/%s on %s port %d\n" % (
                        prog, name, transport, host, port))
        if server.stops_at is not None:
            lines.append("%s: stops at %s, after %s (--for)\n" % (
                prog, time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                    time.localtime(server.stops_at)),
                _duration_text(server.duration)))
        lines.append("%s: running as %s, pid %d\n" % (prog, who, os.getpid()))
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
        server.serve_forever()
        if server.verbosity:
            server.log_counters()
    return 0


def _table(rows, columns):
    """Aligned columns for people."""
    cells = [[title for title, _ in columns]]
    for row in rows:
        cells.append([render(row) for _, render in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "".join("  ".join(cell.ljust(width) for cell, width in
                             zip(line, widths)).rstrip() + "\n"
                   for line in cells)


def _figure(value):
    """A figure for the table: '-' where there is none (JSON: null)."""
    return "-" if value is None else str(value)


def _rtt_text(row, prefix=""):
    """'min/p50/p90/p99/max a/b/c/d/e µs' from a row's percentile keys."""
    names = ("min", "p50", "p90", "p99", "max")
    if prefix + "p50_us" not in row:
        return "none (nothing came back)"
    return "%s %s µs" % ("/".join(names), "/".join(
        "%s" % row[prefix + name + "_us"] for name in names))


def _measure_detail(row):
    test = row["test"]
    if "unit" not in row:               # a test an error stopped at once
        return "port %d" % row["port"] if row["port"] else "-"
    if test == "udp":
        text = ("sent %d at %g pps (asked %g), received %d, lost %d, late %d "
                "(after %g s), duplicated %d, reordered %d; RTT %s" % (
                    row["sent"], row["rate_sent_pps"], row["rate_asked_pps"],
                    row["received"], row["lost"], row["late"],
                    row["late_after_s"], row["duplicated"], row["reordered"],
                    _rtt_text(row)))
        if "pdv_us" in row:
            text += "; PDV %s µs" % row["pdv_us"]
        if "ipdv_mean_us" in row:
            text += ", IPDV %s µs" % row["ipdv_mean_us"]
        if row["foreign"]:
            text += "; %d replies not ours or cut short" % row["foreign"]
        if row["errors"]:
            text += "; errors: " + ", ".join(
                "%s %d" % item for item in sorted(row["errors"].items()))
        if row["client_limited"]:
            text += ("; CLIENT-LIMITED: this host could not send at the asked "
                     "rate, so these figures describe it, not the path")
        return text
    if test == "loaded":
        text = "idle %s; loaded %s; increase p50 %+.1f p99 %+.1f µs" % (
            _rtt_text(row, "idle_"), _rtt_text(row, "loaded_"),
            row.get("increase_p50_us", 0), row.get("increase_p99_us", 0))
        if "loaded_loss_pct" in row:
            text += "; loss idle %g %% loaded %g %%" % (
                row["idle_loss_pct"], row["loaded_loss_pct"])
        return text + "; load: download %g MB/s, upload %g MB/s" % (
            row["download_mbyte_per_s"], row["upload_mbyte_per_s"])
    if test == "mtu":
        return row["detail"]
    if test == "latency":
        text = "%d round trips; min %s p90 %s p99 %s max %s µs" % (
            row["count"], _figure(row.get("min_us")),
            _figure(row.get("p90_us")), _figure(row.get("p99_us")),
            _figure(row.get("max_us")))
        if "loss_pct" in row:
            text += "; loss %s %%" % row["loss_pct"]
        if row["wrong_replies"]:
            text += "; wrong replies %d" % row["wrong_replies"]
        return text
    if test in ("download", "echo"):
        text = "%.1f MB in %.1f s; wrong bytes %d" % (
            row["bytes"] / 1e6, row["seconds"], row["wrong_bytes"])
        if "first_wrong_byte" in row:
            text += " (first at byte %d)" % row["first_wrong_byte"]
        if test == "echo":
            text += "; missing %d" % row["missing_bytes"]
        return text
    if test == "upload":
        return "%.1f MB in %.1f s; %s" % (row["bytes"] / 1e6, row["seconds"],
                                          "drained" if row["drained"] else
                                          "not drained")
    kinds = ", ".join("%s %d" % item for item in
                      sorted(row["error_kinds"].items()))
    return "%d %s connections; p50 %s p99 %s µs; errors %d%s" % (
        row["count"], row["service"], _figure(row.get("p50_us")),
        _figure(row.get("p99_us")), row["errors"],
        " (%s)" % kinds if kinds else "")


def _write_text(text):
    """Write to stdout; where it cannot take "µ" (Python 3.6 in the C
    locale, say), write "us" for µs rather than fail."""
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        text = text.replace(u"\u00b5", "u")
    sys.stdout.write(text)


def _client_parser(command):
    import argparse
    examples = {
        "probe": "example:\n"
                 "  python3 diagsvc.py probe far.example.net echo chargen "
                 "--tcp --port-offset 10000\n"
                 "  checks TCP echo and chargen on ports 10007 and 10019 "
                 "of every address\n"
                 "  far.example.net resolves to; exit status 0 if all are "
                 "open.",
        "measure": "example:\n"
                   "  python3 diagsvc.py measure far.example.net download "
                   "--seconds 10 --parallel 4 \\\n"
                   "          --port-offset 10000\n"
                   "  chargen over 4 TCP connections for 10 s: MB/s, each "
                   "byte checked (RFC 864).",
    }
    parser = argparse.ArgumentParser(
        prog="diagsvc " + command,
        description="Is each service open and answering as its RFC says?"
        if command == "probe" else "How fast is the path to HOST's "
        "diagnostic services?",
        epilog=examples[command],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", metavar="HOST", help="the server: a name "
                        "(every address it resolves to) or an address")
    if command == "probe":
        parser.add_argument("services", nargs="*", metavar="SERVICE",
                            help="more hosts, and services (default: all of "
                            "%s)" % ", ".join(SERVICE_NAMES))
        transport = parser.add_mutually_exclusive_group()
        transport.add_argument("--tcp", action="store_true", help="TCP only")
        transport.add_argument("--udp", action="store_true", help="UDP only")
    else:
        parser.add_argument("tests", nargs="*", metavar="TEST",
                            help="more hosts, and tests: %s (default: %s)" % (
                                ", ".join(MEASURE_TESTS),
                                ", ".join(DEFAULT_MEASURE_TESTS)))
        parser.add_argument("--seconds", type=_positive(float),
                            default=5.0, metavar="S",
                            help="each test's duration (default %(default)s)")
        parser.add_argument("--parallel", type=_non_negative(int), default=1,
                            metavar="N", help="connections at once for "
                            "download, upload, connect; load streams each "
                            "way for loaded; flows for udp (default 1)")
        parser.add_argument("--connect-service", choices=("daytime", "time"),
                            default="daytime", help="the one-shot service "
                            "the connect test uses (default %(default)s)")
        udp = parser.add_argument_group(
            "udp (any two of --rate, --bitrate, --size; default %g pps of %d "
            "bytes)" % (DEFAULT_STREAM_RATE, DEFAULT_STREAM_SIZE))
        udp.add_argument("--rate", type=_positive(float), metavar="PPS",
                         help="datagrams a second, all flows together")
        udp.add_argument("--bitrate", type=_bitrate, metavar="BITS",
                         help="UDP payload bits a second (10M, 500k...)")
        udp.add_argument("--size", type=_positive(int), metavar="BYTES",
                         help="payload bytes, %d to 65507 (65527 over IPv6)"
                         % STREAM_MIN_SIZE)
        report = parser.add_argument_group("reporting and thresholds")
        report.add_argument("--interval", type=_positive(float), metavar="S",
                            help="a row every S seconds during each test "
                            "(with --json: newline-delimited JSON)")
        report.add_argument("--max-loss", type=_non_negative(float),
                            metavar="PCT", help="exit 1 if a loss_pct is "
                            "above PCT")
        report.add_argument("--max-rtt", type=_non_negative(float),
                            metavar="MS", help="exit 1 if an RTT percentile "
                            "(--rtt-percentile) is above MS milliseconds")
        report.add_argument("--rtt-percentile", type=int, default=99,
                            choices=(50, 90, 99), help="for --max-rtt "
                            "(default %(default)s)")
        report.add_argument("--min-rate", type=_non_negative(float),
                            metavar="MB/S", help="exit 1 if download, upload "
                            "or echo is below MB/S (10^6 bytes a second)")
    parser.add_argument("--port-offset", type=_non_negative(int), default=0,
                        metavar="N", help="the server's --port-offset: "
                        "standard port + N (default 0)")
    parser.add_argument("--port", action="append", type=_port_assignment,
                        default=[], metavar="SERVICE=PORT",
                        help="one service's port, over the offset "
                        "(repeatable)")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=4,
                        help="IPv4 only")
    family.add_argument("-6", dest="family", action="store_const", const=6,
                        help="IPv6 only")
    parser.add_argument("--timeout", type=_positive(float),
                        default=DEFAULT_PROBE_TIMEOUT, metavar="S",
                        help="per answer (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="a JSON array, one object a row")
    # HOST [HOST ...] [NAME ...]: a word that names a service (probe) or a
    # test (measure) is one; every other word is a host.
    return parser


def _interval_text(row):
    """One --interval row for people: the test, the span, what moved."""
    parts = ["%s %s" % (row["test"], row["transport"]),
             "%.2f-%.2f s" % (row["start_s"], row["end_s"])]
    if "phase" in row:
        parts.append(row["phase"])
    if "mbyte_per_s" in row:
        parts.append("%.1f MB/s" % row["mbyte_per_s"])
    for key in ("count", "sent", "received", "errors", "payload_bytes"):
        if key in row:
            parts.append("%s %d" % (key, row[key]))
    if "p50_us" in row:
        parts.append("RTT p50 %s p99 %s µs" % (row["p50_us"], row["p99_us"]))
    return "  ".join(parts) + "\n"


def _threshold_failures(rows, options):
    """One sentence for each threshold a row crossed (--max-loss, --max-rtt,
    --min-rate)."""
    failures = []
    percentile = "p%d_us" % options.rtt_percentile
    for row in rows:
        name = "%s %s/%s" % (row["host"], row["test"], row["transport"])
        if row.get("flow") not in (None, "total"):
            name += " flow %s" % row["flow"]
        for key in sorted(row):
            if options.max_loss is not None and key.endswith("loss_pct") \
                    and row[key] > options.max_loss:
                failures.append("%s: %s %g %% is above --max-loss %g" % (
                    name, key, row[key], options.max_loss))
            # RTTs: latency, udp and loaded (both phases, not the
            # increase); not connect, whose percentiles are whole
            # connections.
            if options.max_rtt is not None and row["test"] != "connect" \
                    and (key == percentile or key in ("idle_" + percentile,
                                                      "loaded_" + percentile)) \
                    and row[key] > options.max_rtt * 1000.0:
                failures.append("%s: %s %g ms is above --max-rtt %g" % (
                    name, key, row[key] / 1000.0, options.max_rtt))
        if options.min_rate is not None and \
                row["test"] in ("download", "upload", "echo") and \
                row["value"] is not None and row["value"] < options.min_rate:
            failures.append("%s: %g MB/s is below --min-rate %g" % (
                name, row["value"], options.min_rate))
    return failures


def _client_main(argv):
    import json                         # here, not at the top: import cost
    command = argv[0]
    parser = _client_parser(command)
    options = _parse_mixed(parser, argv[1:], "services" if command == "probe"
                           else "tests")
    words = options.services if command == "probe" else options.tests
    choices = SERVICE_NAMES if command == "probe" else MEASURE_TESTS
    names = [word for word in words if word in choices]
    hosts = [options.host] + [word for word in words if word not in choices]
    stream = options.json and command == "measure" and options.interval

    def report(row):                    # --interval: rows as they come
        if stream:
            line = {"type": row.get("type", "summary")}     # first, always
            line.update((key, value) for key, value in row.items()
                        if key != "type")
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        elif row.get("type") == "interval":
            prefix = "[%s] " % row["host"] if len(hosts) > 1 else ""
            _write_text(prefix + _interval_text(row))
            sys.stdout.flush()

    rows = []
    unresolved = {}                     # host: the reason, for its own row
    try:
        for host in hosts:
            try:
                _resolve_targets(host, options.family)
            except ServerError as error:
                # A lone word may be a mistyped test or service: a usage
                # error.  A name with a dot or a colon is a host that does
                # not resolve: its own error row, and the others measured.
                if "." not in host and ":" not in host:
                    raise ServerError("%s (nor is it a %s: %s)" % (
                        error, "service" if command == "probe" else "test",
                        ", ".join(choices)))
                unresolved[host] = str(error)
        if command == "measure" and (options.parallel < 1 or
                                     options.seconds <= 0):
            parser.error("--parallel and --seconds must be above 0")
        for host in hosts:
            if host in unresolved:
                rows.append({"host": host, "address": None, "port": None,
                             "transport": "-", "error": unresolved[host]})
                rows[-1].update(
                    {"service": "-", "verdict": "error", "rtt_ms": None,
                     "detail": unresolved[host]} if command == "probe" else
                    {"test": "-", "value": None})
                if stream:
                    report(rows[-1])
            elif command == "probe":
                rows += probe(host, names,
                              ("tcp",) if options.tcp else ("udp",)
                              if options.udp else TRANSPORTS,
                              options.port_offset, dict(options.port),
                              options.family, options.timeout)
            else:
                rows += measure(host, names, options.seconds,
                                options.parallel, options.port_offset,
                                dict(options.port), options.family,
                                options.timeout, options.connect_service,
                                progress=sys.stderr.isatty(),
                                rate=options.rate, bitrate=options.bitrate,
                                size=options.size, interval=options.interval,
                                report=report if options.interval else None)
    except (ServerError, ValueError) as error:
        # No such host, echo misbehaved, a udp size that cannot be.
        sys.stderr.write("diagsvc %s: error: %s\n" % (command, error))
        return 2
    except OSError as error:
        sys.stderr.write("diagsvc %s: error: %s\n" % (
            command, error.strerror or error))
        return 1
    several = len(hosts) > 1
    host_column = [("HOST", lambda r: r["host"])] if several else []
    if stream:
        pass                            # every row is out already
    elif options.json:
        # ASCII with escapes ("\u00b5s"): valid JSON whatever the locale.
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    elif command == "probe":
        _write_text(_table(rows, host_column + [
            ("SERVICE", lambda r: r["service"]),
            ("PROTO", lambda r: r["transport"]),
            ("ADDRESS", lambda r: r["address"] or "-"),
            ("PORT", lambda r: str(r["port"] or "-")),
            ("VERDICT", lambda r: r["verdict"]),
            ("RTT", lambda r: "-" if r["rtt_ms"] is None else
             "%.2f ms" % r["rtt_ms"]),
            ("DETAIL", lambda r: r["detail"])]))
    else:
        _write_text(_table(rows, host_column + [
            ("TEST", lambda r: "%s %s" % (r["test"], r["flow"])
             if r.get("parallel", 1) > 1 and "flow" in r else r["test"]),
            ("PROTO", lambda r: r["transport"]),
            ("RESULT", lambda r: "-" if r["value"] is None else
             "%s %s" % (r["value"], r["unit"])),
            ("DETAIL", lambda r: "; ".join(
                [_measure_detail(r)] + ["FAILED: " + reason for reason in
                                        _measure_row_failures(r)]))]))
    if command == "probe":
        return 0 if all(row["verdict"] in PROBE_OK for row in rows) else 1
    crossed = _threshold_failures(rows, options)
    for crossing in crossed:
        sys.stderr.write("diagsvc measure: failed: %s\n" % crossing)
    return 1 if _measure_failures(rows) or crossed else 0


def _install_signal_handlers(server):
    import signal

    def stop(signum, frame):
        server.shutdown()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda signum, frame: server.log_counters())


def main(argv=None):
    """The command line; returns the exit status (2 for usage errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in ("probe", "measure"):
            return _client_main(argv)
        return _serve_main(argv)
    except SystemExit as exit:          # argparse: --help, --version, errors
        return exit.code if isinstance(exit.code, int) else 0 if \
            exit.code is None else 2


if __name__ == "__main__":
    sys.exit(main())
