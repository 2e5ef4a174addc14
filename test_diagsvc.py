"""Tests for diagsvc: real servers on port 0, real sockets, exact bytes.

Run: python3 -m unittest -v test_diagsvc   (pytest works too)
"""

import errno
import gc
import io
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings

import diagsvc

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "diagsvc.py")
HAVE_IPV6 = diagsvc._ipv6_available()
FAMILIES = [("127.0.0.1", socket.AF_INET)]
if HAVE_IPV6:
    FAMILIES.append(("::1", socket.AF_INET6))
TIMEOUT = 10.0                  # a bound for any one wait, never a sleep
START_LINE = re.compile(
    r"^diagsvc: serving (\w+)/(tcp|udp) on (\S+) port (\d+)$")
DAYTIME = re.compile(
    rb"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|"
    rb"Oct|Nov|Dec) ([ 1-3]\d) (\d\d):(\d\d):(\d\d) (\d{4})\r\n$")
MONTHS = [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug",
          b"Sep", b"Oct", b"Nov", b"Dec"]


def expected_chargen(line_count, first_line=1):
    """The RFC 864 stream, built independently of diagsvc."""
    lines = []
    for index in range(first_line - 1, first_line - 1 + line_count):
        start = index % 95
        lines.append(bytes(32 + (start + column) % 95 for column in range(72))
                     + b"\r\n")
    return b"".join(lines)


def bind_below_ephemeral(sock, host):
    """Bind a UDP client below the kernel's ephemeral range (Linux: 32768
    on), where no port-0 server of these tests lives: an ephemeral client
    port can equal one of the server's own ports, which the loop guard
    rightly refuses."""
    import random
    for _ in range(200):
        try:
            sock.bind((host, random.randrange(11000, 19000)))
            return
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
    sock.bind((host, 0))


def wait_until(predicate, timeout=TIMEOUT, message="condition"):
    """Poll with a deadline: for state that another thread changes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + message)
        time.sleep(0.005)


def recv_exactly(sock, size):
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_to_eof(sock, limit=1 << 26):
    chunks = []
    total = 0
    while total <= limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


class ServerTestCase(unittest.TestCase):
    """Start servers on port 0 on one loopback address; close them after."""

    selector = None

    def start_server(self, services=None, host="127.0.0.1", **options):
        options.setdefault("selector", self.selector)
        server = diagsvc.Server(services, bind=[host], port_offset=None,
                                **options)
        self.addCleanup(server.close)
        server.start()
        return server

    def connect(self, server, service, host="127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        port = server.addresses[service, "tcp"][0][1]
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        return sock

    def udp_socket(self, host="127.0.0.1", timeout=TIMEOUT):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(timeout)
        bind_below_ephemeral(sock, host)
        return sock

    def udp_exchange(self, server, service, payload, host="127.0.0.1"):
        sock = self.udp_socket(host)
        port = server.addresses[service, "udp"][0][1]
        sock.sendto(payload, (host, port))
        reply, source = sock.recvfrom(1 << 17)
        self.assertEqual(source[1], port)
        return reply

    def assert_no_reply(self, sock, server, host):
        """The datagram was handled and nothing came back.

        One loop thread handles datagrams in turn: once an echo sent after
        it has come back, any reply to the first is already queued here.
        """
        probe = self.udp_socket(host)
        probe.sendto(b"marker", (host, server.addresses["echo", "udp"][0][1]))
        self.assertEqual(probe.recv(100), b"marker")
        sock.setblocking(False)
        with self.assertRaises(BlockingIOError):
            sock.recv(70000)


# --- Pure content ---------------------------------------------------------


class ContentTest(unittest.TestCase):

    def test_chargen_lines_follow_rfc_864(self):
        self.assertEqual(diagsvc.chargen_line(1),
                         bytes(range(32, 104)) + b"\r\n")
        self.assertEqual(diagsvc.chargen_line(2)[:1], b"!")
        self.assertEqual(diagsvc.chargen_line(95)[:2], b"~ ")
        self.assertEqual(diagsvc.chargen_line(96), diagsvc.chargen_line(1))
        self.assertEqual(diagsvc.chargen_stream(200 * 74),
                         expected_chargen(200))
        self.assertEqual(len(diagsvc.CHARGEN_PERIOD), 95 * 74)

    def test_daytime_is_ctime_in_english(self):
        moment = 1232412198          # 2009-01-20 00:43:18 UTC
        text = diagsvc.daytime_text(moment)
        local = time.localtime(moment)
        match = DAYTIME.match(text)
        self.assertIsNotNone(match, text)
        self.assertEqual(int(match.group(3)), local.tm_mday)
        self.assertEqual(MONTHS.index(match.group(2)) + 1, local.tm_mon)
        self.assertEqual(match.group(4, 5, 6), tuple(
            b"%02d" % field for field in local[3:6]))
        self.assertEqual(text[-2:], b"\r\n")
        self.assertEqual(len(text), 26)

    def test_time_is_rfc_868_with_era_wrap(self):
        self.assertEqual(diagsvc.time_bytes(0), struct.pack("!I", 2208988800))
        # 2036-02-07 06:28:16 UTC: the 32-bit count wraps to 0, and goes on.
        wrap = (1 << 32) - 2208988800
        self.assertEqual(diagsvc.time_bytes(wrap), b"\0\0\0\0")
        self.assertEqual(diagsvc.time_bytes(wrap + 5), b"\0\0\0\x05")

    def test_quotes_parse_from_fortune_format(self):
        quotes = diagsvc.parse_quotes("one\n\tindented\n%\n%\ntwo\n%\n")
        self.assertEqual(quotes, (b"one\r\n        indented\r\n", b"two\r\n"))

    def test_quote_errors_name_the_line(self):
        with self.assertRaisesRegex(diagsvc.QuoteFileError, "line 3"):
            diagsvc.parse_quotes("fine\n%\nbell \x07 here\n")
        with self.assertRaisesRegex(diagsvc.QuoteFileError, "lines 3-10 is 576 characters"):
            diagsvc.parse_quotes("ok\n%\n" + ("x" * 70 + "\n") * 8 + "%\n")
        with self.assertRaisesRegex(diagsvc.QuoteFileError, "no quotes"):
            diagsvc.parse_quotes("%\n%\n")

    def test_quote_file_errors(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "quotes")
            with self.assertRaisesRegex(diagsvc.QuoteFileError,
                                        "cannot read quote file"):
                diagsvc.load_quotes(path)
            with open(path, "wb") as quote_file:
                quote_file.write(b"fine\n%\nna\xefve\n")
            with self.assertRaisesRegex(diagsvc.QuoteFileError,
                                        "line 3 holds byte 0xef"):
                diagsvc.load_quotes(path)

    def test_builtin_quotes_are_rfc_865(self):
        server = diagsvc.Server(["qotd"], bind=["127.0.0.1"], port_offset=None)
        server.close()
        for quote in server.quotes:
            self.assertLess(len(quote), 512)
            self.assertTrue(quote.endswith(b"\r\n"))
            self.assertTrue(all(32 <= byte < 127 or byte in b"\r\n"
                                for byte in quote))


# --- The services, over each transport and address family ------------------


class ServiceTest(ServerTestCase):
    """Every service x transport x address family, byte for byte."""

    def each_family(self):
        for host, family in FAMILIES:
            with self.subTest(host=host):
                yield host, self.start_server(host=host)

    def test_echo_tcp_one_mebibyte_with_half_close(self):
        payload = os.urandom(1 << 20)
        for host, server in self.each_family():
            sock = self.connect(server, "echo", host)

            def send():
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            sender = threading.Thread(target=send)
            sender.start()
            received = recv_to_eof(sock)
            sender.join()
            self.assertEqual(len(received), len(payload))
            self.assertTrue(received == payload)

    def test_discard_tcp_reads_ten_mebibytes_and_sends_nothing(self):
        block = b"\xa5" * (1 << 20)
        for host, server in self.each_family():
            sock = self.connect(server, "discard", host)
            for _ in range(10):
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_to_eof(sock), b"")
            counters = server.counters["discard", "tcp"]
            self.assertEqual(counters.bytes_in, 10 << 20)
            self.assertEqual(counters.bytes_out, 0)

    def test_chargen_tcp_first_200_lines_exact(self):
        for host, server in self.each_family():
            sock = self.connect(server, "chargen", host)
            sock.sendall(b"input is read and thrown away\r\n")
            self.assertEqual(recv_exactly(sock, 200 * 74),
                             expected_chargen(200))

    def test_chargen_tcp_both_send_paths(self):
        server = self.start_server(["chargen"])
        if hasattr(os, "sendfile"):
            self.assertIsNotNone(server.chargen_ring_file)
        server.chargen_ring_file = None         # the send() path (Windows)
        sock = self.connect(server, "chargen")
        self.assertEqual(recv_exactly(sock, 300 * 74), expected_chargen(300))

    def test_chargen_tcp_streams_are_independent(self):
        server = self.start_server(["chargen"])
        first = self.connect(server, "chargen")
        self.assertEqual(recv_exactly(first, 74 * 3), expected_chargen(3))
        second = self.connect(server, "chargen")
        self.assertEqual(recv_exactly(second, 74 * 3), expected_chargen(3))

    def test_daytime_tcp_and_udp(self):
        for host, server in self.each_family():
            for text in (recv_to_eof(self.connect(server, "daytime", host)),
                         self.udp_exchange(server, "daytime", b"", host)):
                match = DAYTIME.match(text)
                self.assertIsNotNone(match, text)
                day, month, mday, hh, mm, ss, year = match.groups()
                stamp = time.mktime((int(year), MONTHS.index(month) + 1,
                                     int(mday), int(hh), int(mm), int(ss),
                                     0, 0, -1))
                # One-second resolution, plus slack for a loaded machine.
                self.assertLess(abs(stamp - time.time()), 5.0)

    def test_qotd_tcp_and_udp(self):
        for host, server in self.each_family():
            for quote in (recv_to_eof(self.connect(server, "qotd", host)),
                          self.udp_exchange(server, "qotd", b"x", host)):
                self.assertIn(quote, server.quotes)
                self.assertLess(len(quote), 512)

    def test_time_tcp_and_udp(self):
        for host, server in self.each_family():
            for reply in (recv_to_eof(self.connect(server, "time", host)),
                          self.udp_exchange(server, "time", b"", host)):
                self.assertEqual(len(reply), 4)
                now = (int(time.time()) + 2208988800) % (1 << 32)
                self.assertLess(abs(struct.unpack("!I", reply)[0] - now), 5)

    def test_echo_udp_sizes_including_empty_and_largest(self):
        for host, server in self.each_family():
            largest = 65507 if ":" not in host else 65527
            for size in (0, 1, 1472, largest):
                payload = os.urandom(size)
                self.assertEqual(
                    self.udp_exchange(server, "echo", payload, host), payload)

    def test_chargen_udp_sizes_and_pattern(self):
        for host, server in self.each_family():
            sock = self.udp_socket(host)
            port = server.addresses["chargen", "udp"][0][1]
            sizes = []
            ring = expected_chargen(95 * 2)
            for _ in range(40):
                sock.sendto(b"", (host, port))
                reply = sock.recv(2048)
                sizes.append(len(reply))
                self.assertLessEqual(len(reply), 512)
                # Each reply is the stream from the start of some line.
                starts = [line * 74 for line in range(95)
                          if ring[line * 74:line * 74 + len(reply)] == reply]
                self.assertTrue(starts, reply)
            self.assertGreater(len(set(sizes)), 5)

    def test_discard_udp_sends_nothing(self):
        for host, server in self.each_family():
            sock = self.udp_socket(host)
            sock.sendto(b"drop me", (host, server.addresses["discard",
                                                            "udp"][0][1]))
            wait_until(lambda: server.counters["discard", "udp"].datagrams,
                       message="the discard datagram")
            self.assert_no_reply(sock, server, host)

    @unittest.skipUnless(sys.platform.startswith("linux"),
                         "127.0.0.2 is a local address on Linux's loopback")
    def test_udp_reply_leaves_from_the_address_it_was_sent_to(self):
        server = self.start_server(["echo"], host="0.0.0.0")
        port = server.addresses["echo", "udp"][0][1]
        sock = self.udp_socket()
        sock.connect(("127.0.0.2", port))   # drops replies from elsewhere
        sock.send(b"via 127.0.0.2")
        self.assertEqual(sock.recv(100), b"via 127.0.0.2")


class SelectorTest(ServerTestCase):
    """The same services under every selector available here, so that the
    poll and select paths of other platforms run on this one too."""

    def test_services_under_each_selector(self):
        payload = os.urandom(300000)
        for selector_class in diagsvc.SELECTORS:
            with self.subTest(selector=selector_class.__name__):
                self.selector = selector_class
                server = self.start_server()
                self.assertIsInstance(server.selector, selector_class)
                sock = self.connect(server, "echo")
                sender = threading.Thread(target=lambda: (
                    sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
                sender.start()
                self.assertTrue(recv_to_eof(sock) == payload)
                sender.join()
                self.assertEqual(
                    recv_exactly(self.connect(server, "chargen"), 74 * 100),
                    expected_chargen(100))
                self.assertEqual(len(recv_to_eof(self.connect(server, "time"))), 4)
                self.assertEqual(self.udp_exchange(server, "echo", b"ping"),
                                 b"ping")
                server.close()


# --- The event loop's bounds ------------------------------------------------


class BoundsTest(ServerTestCase):

    def test_echo_client_that_never_reads_costs_bounded_memory(self):
        server = self.start_server(["echo"], max_output=32768)
        sock = self.connect(server, "echo")
        sock.setblocking(False)
        sent = 0
        block = b"z" * 65536
        deadline = time.monotonic() + TIMEOUT

        def stopped_reading():
            return any(stream.events == diagsvc.EVENT_WRITE
                       for stream in list(server.streams))
        # Send until the server stops reading (its buffers and ours fill):
        # a pause in the server's reading (a busy machine) is not the end.
        while not stopped_reading():
            self.assertLess(time.monotonic(), deadline,
                            "echo never stopped reading")
            try:
                sent += sock.send(block)
            except BlockingIOError:
                select.select([], [sock], [], 0.1)
        self.assertGreater(sent, 1 << 20)
        (stream,) = server.streams
        self.assertLessEqual(len(stream.owed), 32768)
        # What was read is what was sent back or is still owed.
        counters = server.counters["echo", "tcp"]
        self.assertEqual(counters.bytes_in - counters.bytes_out,
                         len(stream.owed))

    def test_readiness_that_did_not_hold_closes_nothing(self):
        # Driven by hand (no loop thread): accept, then report errors.
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                transports=["tcp"], port_offset=None)
        self.addCleanup(server.close)
        client = socket.create_connection(server.addresses["echo", "tcp"][0],
                                          TIMEOUT)
        self.addCleanup(client.close)
        server.listeners[0].on_event(diagsvc.EVENT_READ)
        (stream,) = server.streams
        server._handler_failed(stream, BlockingIOError(errno.EAGAIN, "again"))
        self.assertIn(stream, server.streams)
        server._handler_failed(stream, ConnectionResetError())
        self.assertNotIn(stream, server.streams)
        self.assertEqual(stream.sock.fileno(), -1)

    def test_a_peer_error_closes_that_connection_only(self):
        server = self.start_server(["echo", "chargen"])
        victim = self.connect(server, "chargen")
        recv_exactly(victim, 1000)
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                          struct.pack("ii", 1, 0))
        victim.close()                  # RST while the server is sending
        wait_until(lambda: not any(isinstance(s, diagsvc.ChargenStream)
                                   for s in server.streams),
                   message="the reset chargen connection to close")
        sock = self.connect(server, "echo")
        sock.sendall(b"still here")
        self.assertEqual(recv_exactly(sock, 10), b"still here")


# --- Safety: limits, timeouts, guards, access (issue 3) ---------------------

ON_LINUX = sys.platform.startswith("linux")
needs_linux = unittest.skipUnless(
    ON_LINUX, "needs Linux (127.0.0.2 on loopback, /proc)")


def sock_from(host, port=0, kind=socket.SOCK_STREAM):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.settimeout(TIMEOUT)
    if port == 0 and kind == socket.SOCK_DGRAM:
        bind_below_ephemeral(sock, host)
    else:
        sock.bind((host, port))
    return sock


class SafetyTest(ServerTestCase):

    def assert_echoes(self, sock, data=b"ping"):
        sock.sendall(data)
        self.assertEqual(recv_exactly(sock, len(data)), data)

    def assert_closed_at_once(self, sock):
        self.assertEqual(sock.recv(100), b"")

    def test_per_source_limit(self):
        server = self.start_server(["echo"], max_per_source=2)
        first = self.connect(server, "echo")
        second = self.connect(server, "echo")
        self.assert_echoes(first)
        self.assert_echoes(second)
        self.assert_closed_at_once(self.connect(server, "echo"))
        self.assertEqual(server.counters["echo", "tcp"].refusals,
                         {"max-per-source": 1})
        self.assert_echoes(first)
        self.assert_echoes(second)
        if ON_LINUX:                    # another source still gets in
            other = sock_from("127.0.0.2")
            self.addCleanup(other.close)
            other.connect(server.addresses["echo", "tcp"][0])
            self.assert_echoes(other)
        second.close()
        wait_until(lambda: len(server.streams) == 1 + ON_LINUX,
                   message="the closed connection to be dropped")
        self.assert_echoes(self.connect(server, "echo"))

    def test_total_limit(self):
        server = self.start_server(["echo", "chargen"], max_connections=2,
                                   max_per_source=0)
        first = self.connect(server, "echo")
        second = self.connect(server, "chargen")
        self.assert_echoes(first)
        self.assert_closed_at_once(self.connect(server, "echo"))
        self.assertEqual(server.counters["echo", "tcp"].refusals,
                         {"max-connections": 1})
        self.assert_echoes(first)
        self.assertEqual(recv_exactly(second, 74), expected_chargen(1))

    def test_idle_timeout_closes_silent_echo_and_stalled_chargen(self):
        # The talker keeps a byte moving every 0.1 s and must survive: a
        # timeout ten times that pace leaves room for a loaded machine that
        # does not schedule this process for a while.
        server = self.start_server(["echo", "chargen"], idle_timeout=1.0)
        talker = self.connect(server, "echo")
        started = time.monotonic()
        silent = self.connect(server, "echo")
        stalled = self.connect(server, "chargen")     # never reads
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        wait_until(lambda: len(server.streams) == 3,
                   message="the three connections to be accepted")
        # Talk until the other two are closed, a second or more after the
        # talker came: it outlives an idle timeout only by talking.
        while len(server.streams) > 1:
            self.assertLess(time.monotonic() - started, TIMEOUT,
                            "the idle connections are still open")
            self.assert_echoes(talker, b"t")
            time.sleep(0.1)         # the pace of a live client, not a sync
        self.assertGreater(time.monotonic() - started, 1.0)
        self.assertEqual(silent.recv(10), b"")      # closed (TIMEOUT bounds it)
        self.assertEqual(server.counters["echo", "tcp"].refusals,
                         {"idle-timeout": 1})
        self.assertEqual(server.counters["chargen", "tcp"].refusals,
                         {"idle-timeout": 1})
        self.assert_echoes(talker)

    @needs_linux
    def test_udp_loop_guard(self):
        server = self.start_server(["echo", "chargen"])
        echo_port = server.addresses["echo", "udp"][0][1]
        chargen_port = server.addresses["chargen", "udp"][0][1]
        target = ("127.0.0.1", echo_port)
        # From a port this server itself listens on (on another address).
        for port in (echo_port, chargen_port):
            guarded = sock_from("127.0.0.2", port, socket.SOCK_DGRAM)
            self.addCleanup(guarded.close)
            guarded.sendto(b"loop?", target)
            self.assert_no_reply(guarded, server, "127.0.0.1")
        if os.geteuid() == 0:           # the standard chargen port itself
            guarded = sock_from("127.0.0.3", 19, socket.SOCK_DGRAM)
            self.addCleanup(guarded.close)
            guarded.sendto(b"loop?", target)
            self.assert_no_reply(guarded, server, "127.0.0.1")
        refused = 3 if os.geteuid() == 0 else 2
        self.assertEqual(server.counters["echo", "udp"].refusals,
                         {"loop-guard": refused})
        # The same datagram from an ordinary port is answered.
        ordinary = sock_from("127.0.0.2", 0, socket.SOCK_DGRAM)
        self.addCleanup(ordinary.close)
        ordinary.sendto(b"loop?", target)
        self.assertEqual(ordinary.recv(100), b"loop?")

    @needs_linux
    def test_udp_guard_can_be_turned_off(self):
        server = self.start_server(["echo"], udp_guard=False)
        port = server.addresses["echo", "udp"][0][1]
        guarded = sock_from("127.0.0.2", port, socket.SOCK_DGRAM)
        self.addCleanup(guarded.close)
        guarded.sendto(b"lab", ("127.0.0.1", port))
        self.assertEqual(guarded.recv(100), b"lab")

    def test_group_addresses(self):
        self.assertTrue(diagsvc._is_group_address("255.255.255.255"))
        self.assertTrue(diagsvc._is_group_address("224.0.0.1"))
        self.assertTrue(diagsvc._is_group_address("ff02::1"))
        self.assertFalse(diagsvc._is_group_address("223.255.255.255"))
        self.assertFalse(diagsvc._is_group_address("fe80::1"))
        self.assertTrue(diagsvc._is_group_destination(b"\xef\0\0\1"))
        self.assertTrue(diagsvc._is_group_destination(b"\xff" * 4))
        self.assertFalse(diagsvc._is_group_destination(b"\x7f\0\0\1"))
        self.assertTrue(diagsvc._is_group_destination(b"\xff\x02" + b"\0" * 14))

    def test_udp_rate_limit_spares_echo(self):
        # A rate so low that no token comes back during the test, however
        # slow the machine: exactly the burst is answered.
        server = self.start_server(["echo", "daytime"], udp_rate=0.001,
                                   udp_burst=3)
        sock = self.udp_socket()
        daytime = server.addresses["daytime", "udp"][0]
        for _ in range(3):
            sock.sendto(b"", daytime)
            self.assertTrue(DAYTIME.match(sock.recv(100)))
        sock.sendto(b"", daytime)
        sock.sendto(b"", daytime)
        wait_until(lambda: server.counters["daytime", "udp"].datagrams == 5,
                   message="five daytime datagrams")
        self.assert_no_reply(sock, server, "127.0.0.1")
        self.assertEqual(server.counters["daytime", "udp"].refusals,
                         {"rate-limit": 2})
        # echo is 1:1 and not limited.
        for number in range(20):
            self.assertEqual(self.udp_exchange(server, "echo", b"%d" % number),
                             b"%d" % number)
        # After the window (one token a 0.25 s) replies resume: waiting
        # longer (a loaded machine) only brings more tokens.
        server = self.start_server(["daytime"], udp_rate=4.0, udp_burst=1)
        daytime = server.addresses["daytime", "udp"][0]
        sock = self.udp_socket()
        sock.sendto(b"", daytime)
        self.assertTrue(DAYTIME.match(sock.recv(100)))
        time.sleep(0.3)             # waiting out the window is the point
        sock.sendto(b"", daytime)
        self.assertTrue(DAYTIME.match(sock.recv(100)))

    @needs_linux
    def test_allow_and_deny_ipv4(self):
        server = self.start_server(["echo"], allow=["127.0.0.0/8"],
                                   deny=["127.0.0.2"])
        self.assert_echoes(self.connect(server, "echo"))
        denied = sock_from("127.0.0.2")
        self.addCleanup(denied.close)
        denied.connect(server.addresses["echo", "tcp"][0])
        self.assert_closed_at_once(denied)
        udp = sock_from("127.0.0.2", 0, socket.SOCK_DGRAM)
        self.addCleanup(udp.close)
        udp.sendto(b"x", server.addresses["echo", "udp"][0])
        self.assert_no_reply(udp, server, "127.0.0.1")
        self.assertEqual(server.counters["echo", "tcp"].refusals,
                         {"denied": 1})
        self.assertEqual(server.counters["echo", "udp"].refusals,
                         {"denied": 1})

    @unittest.skipUnless(HAVE_IPV6, "no IPv6")
    def test_allow_and_deny_ipv6(self):
        server = self.start_server(["echo"], host="::1", deny=["::1/128"])
        self.assert_closed_at_once(self.connect(server, "echo", "::1"))
        server = self.start_server(["echo"], host="::1", allow=["::1"])
        self.assert_echoes(self.connect(server, "echo", "::1"))
        server = self.start_server(["echo"], host="::1", allow=["2001:db8::/32"])
        self.assert_closed_at_once(self.connect(server, "echo", "::1"))

    def test_counters(self):
        server = self.start_server(["echo", "discard"])
        sock = self.connect(server, "echo")
        self.assert_echoes(sock, b"x" * 1000)
        sock.close()
        self.udp_exchange(server, "echo", b"y" * 10)
        wait_until(lambda: not server.streams, message="echo to close")
        stats = server.stats()
        self.assertEqual(stats["echo", "tcp"], {
            "connections": 1, "datagrams": 0, "bytes_in": 1000,
            "bytes_out": 1000, "refusals": {}})
        self.assertEqual(stats["echo", "udp"], {
            "connections": 0, "datagrams": 1, "bytes_in": 10,
            "bytes_out": 10, "refusals": {}})

    def test_abusers_do_not_hurt_a_well_behaved_client(self):
        server = self.start_server(max_per_source=0)
        payload = os.urandom(4 << 20)
        good = self.connect(server, "echo")
        received = []
        sender = threading.Thread(target=lambda: (
            good.sendall(payload), good.shutdown(socket.SHUT_WR)))
        sender.start()
        reader = threading.Thread(target=lambda: received.append(
            recv_to_eof(good)))
        reader.start()
        rst = struct.pack("ii", 1, 0)
        for round_number in range(60):
            for service in ("echo", "chargen", "discard", "daytime", "time",
                            "qotd"):
                sock = self.connect(server, service)
                if round_number % 3 == 0:       # garbage, then a reset
                    try:
                        sock.sendall(os.urandom(3000))
                    except OSError:
                        pass                    # a one-shot already closed
                if round_number % 2 == 0:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
                sock.close()                    # or just vanish
            udp = self.udp_socket(timeout=0.0)
            udp.sendto(os.urandom(512), server.addresses["chargen", "udp"][0])
            udp.close()
        sender.join()
        reader.join()
        self.assertTrue(received[0] == payload)
        wait_until(lambda: not server.streams, message="abusers to be closed")
        self.assertTrue(server._running)


class RecordingSocket(object):
    """Stands in for a server's UDP socket: records each send (how many
    datagrams it carried), and refuses them with ``refuse`` (an errno) -
    every send, or with ``segmented_only`` the GSO ones."""

    def __init__(self, sock, refuse=None, segmented_only=False):
        self.sock = sock
        self.sends = []
        self.refuse = refuse
        self.segmented_only = segmented_only

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def _send(self, datagrams, segmented):
        self.sends.append(datagrams)
        if self.refuse and (segmented or not self.segmented_only):
            raise OSError(self.refuse, os.strerror(self.refuse))

    def sendto(self, data, address):
        self._send(1, False)
        return self.sock.sendto(data, address)

    def sendmsg(self, buffers, ancillary=(), flags=0, address=None):
        segmented = any(level == socket.IPPROTO_UDP
                        for level, _, _ in ancillary)
        self._send(len(buffers) if segmented else 1, segmented)
        return self.sock.sendmsg(buffers, ancillary, flags, address)


class UdpPathsTest(unittest.TestCase):
    """Linux's fast UDP path (replies in runs, one GSO send a run) and the
    portable path (one sendto a reply) give the same bytes, counters and
    refusals: under every selector, IPv4 and IPv6, bound and wildcard."""

    HOSTS = [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1")]
    if HAVE_IPV6:
        HOSTS += [("::1", "::1"), ("::", "::1")]

    def start(self, batching, bind, selector, refuse=None,
              segmented_only=False, services=("echo", "discard", "daytime"),
              udp_rate=4.0):
        """A server not yet running, its UDP sockets recorded."""
        server = diagsvc.Server(
            services, bind=[bind], port_offset=None, transports=["udp"],
            selector=selector, udp_rate=udp_rate, udp_burst=3,
            udp_batching=batching)
        self.addCleanup(server.close)
        recorders = {}
        for endpoint in server.endpoints:
            endpoint.sock = recorders[endpoint.service.name] = \
                RecordingSocket(endpoint.sock, refuse, segmented_only)
        return server, recorders

    def client(self, host):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        return sock

    def cases(self):
        return [(selector, bind, host) for selector in diagsvc.SELECTORS
                for bind, host in self.HOSTS]

    def scenario(self, batching, selector, bind, host):
        """Datagrams queued before the loop runs (so that the first read
        finds a batch), then one at a time; returns what came back and
        the counters."""
        server, recorders = self.start(batching, bind, selector)
        ports = dict((name, server.addresses[name, "udp"][0][1])
                     for name in ("echo", "discard", "daytime"))
        # chargen on a server of its own, without the rate limit that
        # daytime's test uses up.
        chargen_server, _ = self.start(batching, bind, selector,
                                       services=["chargen"], udp_rate=0)
        echo, daytime, other = (self.client(host) for _ in range(3))
        guarded = self.client(host)
        guarded.bind((host, 0))
        # The loop guard's port check, on whatever port the kernel chose.
        server.guarded_ports = server.guarded_ports | set(
            [guarded.getsockname()[1]])
        # Distinct payloads, as a client's sequence numbers make them (the
        # loop watch would take repeats for our replies coming back), in
        # runs of one size.
        queued = ([b"%04d" % n + b"e" * 60 for n in range(40)] +
                  [b""] * 3 + [b"%04d" % n + b"m" * 1228 for n in range(5)] +
                  [b"n" * 1233] + [b"%04d" % n + b"s" * 96 for n in range(20)] +
                  [b"last"])
        repeater = self.client(host)
        for index, payload in enumerate(queued):
            echo.sendto(payload, (host, ports["echo"]))
            if index == 20:             # refused amid the batch
                guarded.sendto(b"loop?", (host, ports["echo"]))
            if index < 40 and index % 2 == 0:
                # The same bytes again and again: taken for our replies
                # coming back.  All within the first 64 datagrams, read
                # in one pass of the loop (no timer ages the watch).
                repeater.sendto(b"again", (host, ports["echo"]))
        for _ in range(5):              # a burst of 3, then rate-limited
            daytime.sendto(b"", (host, ports["daytime"]))
        other.sendto(b"dropped", (host, ports["discard"]))
        for _ in range(3):
            other.sendto(b"", (host, chargen_server.addresses[
                "chargen", "udp"][0][1]))
        server.start()
        chargen_server.start()
        echoes = [echo.recv(70000) for _ in queued]
        largest = 65527 if ":" in host else 65507
        for size in (0, 1, 1232, 1233, 1472, largest):
            payload = os.urandom(size)
            echo.sendto(payload, (host, ports["echo"]))
            echoes.append(echo.recv(70000) == payload)
        # LOOP_RETURNS + 1 replies, then the watch refuses the rest
        # (checked below: nothing more is waiting, and the counters).
        echoes.append([repeater.recv(100)
                       for _ in range(diagsvc.LOOP_RETURNS + 1)])
        daytimes = [DAYTIME.match(daytime.recv(100)) is not None
                    for _ in range(3)]
        chargens = [other.recv(600) for _ in range(3)]
        ring = expected_chargen(95 * 2)
        for reply in chargens:
            self.assertIn(reply, [ring[line * 74:line * 74 + len(reply)]
                                  for line in range(95)])
        wait_until(lambda: (
            server.counters["daytime", "udp"].datagrams == 5 and
            server.counters["discard", "udp"].datagrams == 1 and
            server.counters["echo", "udp"].datagrams == len(queued) + 7 + 20),
            message="every datagram counted")
        for sock in (echo, daytime, other, guarded, repeater):
            sock.setblocking(False)
            self.assertRaises(BlockingIOError, sock.recv, 70000)
        stats = server.stats()
        stats["chargen", "udp"] = chargen_server.stats()["chargen", "udp"]
        stats["chargen", "udp"]["bytes_out"] = None     # random sizes
        return echoes, daytimes, stats, recorders, queued

    def test_both_paths_give_the_same_bytes_and_refusals(self):
        for selector, bind, host in self.cases():
            with self.subTest(selector=selector.__name__, bind=bind):
                self.check_both_paths(selector, bind, host)

    def check_both_paths(self, selector, bind, host):
        batched = self.scenario(True, selector, bind, host)
        portable = self.scenario(False, selector, bind, host)
        echoes, daytimes, stats, recorders, queued = portable
        answered = diagsvc.LOOP_RETURNS + 1
        self.assertEqual(echoes,
                         queued + [True] * 6 + [[b"again"] * answered])
        self.assertEqual(daytimes, [True] * 3)
        self.assertEqual(stats["echo", "udp"]["refusals"],
                         {"loop-guard": 1, "loop-detected": 20 - answered})
        self.assertEqual(stats["daytime", "udp"]["refusals"],
                         {"rate-limit": 2})
        self.assertEqual(stats["echo", "udp"]["bytes_out"],
                         sum(map(len, queued)) + 5 * answered + 1 + 1232 +
                         1233 + 1472 +
                         (65527 if ":" in host else 65507))
        self.assertEqual(max(recorders["echo"].sends), 1)
        self.assertEqual(batched[:3], portable[:3])
        if ON_LINUX and diagsvc._segmentation_works()[0]:
            # The queued run of 40 equal datagrams left in fewer sends.
            self.assertGreater(max(batched[3]["echo"].sends), 1)
            self.assertEqual(sum(batched[3]["echo"].sends),
                             len(queued) + 6 + answered)

    def refused_sends(self, batching, selector, bind, host, refuse,
                      segmented_only):
        server, recorders = self.start(batching, bind, selector, refuse,
                                       segmented_only)
        port = server.addresses["echo", "udp"][0][1]
        client = self.client(host)
        payloads = [b"%02d" % n * 20 for n in range(12)]
        for payload in payloads:
            client.sendto(payload, (host, port))
        server.start()
        wait_until(lambda: server.counters["echo", "udp"].datagrams == 12,
                   message="twelve datagrams")
        return server, client, payloads

    def test_refused_sends_count_alike_on_both_paths(self):
        for selector, bind, host in self.cases():
            for batching in (True, False):
                with self.subTest(selector=selector.__name__, bind=bind,
                                  batching=batching):
                    self.check_refused_sends(batching, selector, bind, host)

    def check_refused_sends(self, batching, selector, bind, host):
        # Every send refused (a full socket buffer): each reply is
        # counted as failed, none as sent.
        server, client, _ = self.refused_sends(
            batching, selector, bind, host, errno.EAGAIN, False)
        wait_until(lambda: server.counters[
            "echo", "udp"].refusals.get("send-failed") == 12,
            message="twelve failed sends")
        self.assertEqual(server.stats()["echo", "udp"], {
            "connections": 0, "datagrams": 12, "bytes_in": 480,
            "bytes_out": 0, "refusals": {"send-failed": 12}})
        # Only GSO sends refused (a kernel or device without it): every
        # reply still arrives, sent one by one, and GSO stops.
        server, client, payloads = self.refused_sends(
            batching, selector, bind, host, errno.EIO, True)
        self.assertEqual([client.recv(100) for _ in payloads], payloads)
        self.assertEqual(server.stats()["echo", "udp"], {
            "connections": 0, "datagrams": 12, "bytes_in": 480,
            "bytes_out": 480, "refusals": {}})
        if server.udp_batched:
            self.assertFalse(server.endpoints[0].segmenting)

    def test_the_switch(self):
        with diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                            udp_batching=False) as server:
            self.assertFalse(server.udp_batched)
            self.assertIs(type(server.endpoints[0]),
                          diagsvc.DatagramEndpoint)
        with diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                            verbosity=2, log_file=io.StringIO()) as server:
            self.assertFalse(server.udp_batched)    # the log is per datagram
        with diagsvc.Server(["echo"], bind=["127.0.0.1"],
                            port_offset=None) as server:
            works, reason = diagsvc._segmentation_works()
            self.assertEqual(server.udp_batched, works)
            if ON_LINUX and not works:
                self.assertTrue(any(reason in note for note in server.notes))
            if not ON_LINUX:
                self.assertFalse(works)

    def test_a_refused_gso_send_ends_gso_on_that_socket(self):
        # Twelve queued echoes: a GSO send of the first eight is refused
        # (EIO), they go one by one, and the next four never try GSO.
        if not (ON_LINUX and diagsvc._segmentation_works()[0]):
            self.skipTest("no UDP_SEGMENT here")
        server, client, payloads = self.refused_sends(
            True, diagsvc.SELECTORS[0], "127.0.0.1", "127.0.0.1", errno.EIO,
            True)
        self.assertEqual([client.recv(100) for _ in payloads], payloads)
        echo = [endpoint for endpoint in server.endpoints
                if endpoint.service.name == "echo"][0]
        self.assertEqual([count for count in echo.sock.sends if count > 1],
                         [diagsvc.SEGMENT_BATCH])

    def test_linux_runs_the_self_test(self):
        # On Linux the answer is the self-test's, never "not Linux".
        if ON_LINUX:
            self.assertNotEqual(diagsvc._segmentation_works()[1], "not Linux")


class SafetyCommandLineTest(unittest.TestCase):

    @unittest.skipUnless(ON_LINUX and hasattr(os, "geteuid") and
                         os.geteuid() == 0, "needs root and /proc")
    def test_drops_privileges_to_nobody(self):
        server = ServerProcess("echo", "--bind", "127.0.0.1", "--port",
                               "echo=0", "--tcp", "-q")
        self.addCleanup(server.kill)
        self.assertIn("diagsvc: running as user nobody (uid 65534), pid %d"
                      % server.process.pid, server.lines)
        import pwd
        nobody = pwd.getpwnam("nobody")
        with open("/proc/%d/status" % server.process.pid) as status:
            fields = dict(line.split(":", 1) for line in status)
        self.assertEqual(fields["Uid"].split(), [str(nobody.pw_uid)] * 4)
        self.assertEqual(fields["Gid"].split(), [str(nobody.pw_gid)] * 4)
        self.assertEqual(fields["Groups"].split(), [])
        with socket.create_connection(server.addresses["echo", "tcp"][0],
                                      TIMEOUT) as sock:
            sock.sendall(b"as nobody")
            self.assertEqual(recv_exactly(sock, 9), b"as nobody")
        self.assertEqual(server.stop(), 0)

    @unittest.skipUnless(ON_LINUX, "needs /proc for the CPU time")
    def test_out_of_descriptors_pauses_accepting_without_spinning(self):
        import resource

        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        process = subprocess.Popen(
            [sys.executable, SCRIPT, "echo", "--tcp", "--bind", "127.0.0.1",
             "--port", "echo=0", "--max-connections", "1000",
             "--max-per-source", "0", "--user", "root"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, preexec_fn=low_limit)
        self.addCleanup(process.wait)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.kill)
        port = int(START_LINE.match(process.stdout.readline().strip()).group(4))

        def cpu_seconds():
            with open("/proc/%d/stat" % process.pid) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / float(
                os.sysconf("SC_CLK_TCK"))

        clients = []
        self.addCleanup(lambda: [c.close() for c in clients])
        for _ in range(80):             # more than its 48 descriptors
            clients.append(socket.create_connection(("127.0.0.1", port),
                                                    TIMEOUT))
        clients[0].sendall(b"a")        # served before the descriptors ran out
        self.assertEqual(clients[0].recv(1), b"a")
        before = cpu_seconds()
        time.sleep(1.0)                 # the episode whose CPU is measured
        spent = cpu_seconds() - before
        self.assertLess(spent, 0.25, "the server spins at EMFILE")
        self.assertIsNone(process.poll())
        for client in clients[1:]:
            client.close()
        # Descriptors come back: it accepts again and serves a new client.
        fresh = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        clients.append(fresh)
        fresh.sendall(b"back")
        self.assertEqual(recv_exactly(fresh, 4), b"back")
        clients[0].sendall(b"z")
        self.assertEqual(clients[0].recv(1), b"z")
        process.terminate()
        self.assertEqual(process.wait(TIMEOUT), 0)
        self.assertIn("cannot accept: Too many open files", process.stderr.read())

    @unittest.skipIf(sys.platform == "win32", "no SIGUSR1")
    def test_sigusr1_logs_counters(self):
        import signal
        server = ServerProcess("echo", "--bind", "127.0.0.1", "--port",
                               "echo=0", "--udp")
        self.addCleanup(server.kill)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.sendto(b"count me", server.addresses["echo", "udp"][0])
        self.assertEqual(sock.recv(100), b"count me")
        server.process.send_signal(signal.SIGUSR1)
        line = server.process.stderr.readline()
        self.assertRegex(line, r"diagsvc: echo/udp: 1 datagrams, 8 bytes in, "
                               r"8 bytes out\n$")
        self.assertEqual(server.stop(), 0)


# --- The client side: probe and measure (issue 4) ----------------------------


def ports_of(server, transport="tcp"):
    return dict((name, server.addresses[name, transport][0][1])
                for name in server.services)


def probes_at_once(*calls):
    """Run diagsvc.probe(*args, **options) for each (args, options) of
    CALLS, each in its own thread, so that probes whose verdict is a
    timeout wait it out together; return each call's rows, in order."""
    results = [None] * len(calls)

    def run(index, args, options):
        try:
            results[index] = diagsvc.probe(*args, **options)
        except Exception as error:          # raised again in the caller
            results[index] = error
    threads = [threading.Thread(target=run, args=(index,) + tuple(call))
               for index, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()       # each probe ends by its own timeout
    for rows in results:
        if isinstance(rows, Exception):
            raise rows
    return results


class ProbeTest(ServerTestCase):

    def test_every_service_open_on_each_family(self):
        # The UDP discard's open|filtered is a timeout: it is waited out in
        # a probe of its own with a short one (0.5 s), beside the probes of
        # the replies that must come, which keep the generous TIMEOUT.
        servers = [self.start_server(host=host) for host, family in FAMILIES]
        calls = []
        for (host, family), server in zip(FAMILIES, servers):
            ports = ports_of(server)
            calls += [((host,), dict(ports=ports, transports=("tcp",),
                                     timeout=TIMEOUT)),
                      ((host, [name for name in diagsvc.SERVICE_NAMES
                               if name != "discard"], ("udp",)),
                       dict(ports=ports, timeout=TIMEOUT)),
                      ((host, ["discard"], ("udp",)),
                       dict(ports=ports, timeout=0.5))]
        results = probes_at_once(*calls)
        results = [sum(results[index:index + 3], [])
                   for index in range(0, len(results), 3)]
        for (host, family), server, rows in zip(FAMILIES, servers, results):
            with self.subTest(host=host):
                # One port serves both transports here (port 0, reused).
                self.assertEqual(ports_of(server, "tcp"), ports_of(server, "udp"))
                self.assertEqual(len(rows), 12)
                for row in rows:
                    self.assertEqual(set(row), {
                        "service", "transport", "address", "port", "verdict",
                        "rtt_ms", "detail", "host"})
                    self.assertEqual(row["address"], host)
                    self.assertEqual(row["host"], host)
                    expected = ("open|filtered" if row["service"] == "discard"
                                and row["transport"] == "udp" else "open")
                    self.assertEqual(row["verdict"], expected, row)
                    if expected == "open":
                        self.assertGreater(row["rtt_ms"], 0)
                details = dict(((r["service"], r["transport"]), r["detail"])
                               for r in rows)
                self.assertRegex(details["time", "tcp"],
                                 r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(matches "
                                 r"the local clock to the second\)$")
                self.assertEqual(details["echo", "udp"],
                                 "34 bytes echoed and matched")

    def test_nothing_listening(self):
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))      # takes datagrams, never answers
        silent_port = holder.getsockname()[1]
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()                      # nothing listens there now
        rows = diagsvc.probe("127.0.0.1", ["echo"], ports={"echo": closed_port},
                             timeout=1)
        self.assertEqual([(r["transport"], r["verdict"]) for r in rows],
                         [("tcp", "refused"), ("udp", "refused")])
        started = time.monotonic()
        silent = ["discard", "daytime", "qotd", "time"]
        rows = diagsvc.probe("127.0.0.1", silent, ["udp"], ports=dict(
            (name, silent_port) for name in silent), timeout=1.0)
        self.assertEqual([(r["service"], r["verdict"]) for r in rows],
                         [("discard", "open|filtered"),
                          ("daytime", "no-reply"), ("qotd", "no-reply"),
                          ("time", "no-reply")])
        # Concurrent: one timeout in all, where one after another is 4 s;
        # the margin is for a loaded machine.
        self.assertLess(time.monotonic() - started, 3.5)

    def test_wrong_servers(self):
        server = self.start_server(["discard", "echo"])
        discard_port = server.addresses["discard", "tcp"][0][1]
        echo_port = server.addresses["echo", "tcp"][0][1]
        ports = {"echo": discard_port, "chargen": echo_port,
                 "time": echo_port}
        # The UDP echo (chargen's reply) and the discard's close must come
        # back within the generous bound; the other three verdicts are
        # timeouts: a short one, 1 s, waited out by both probes at once.
        rows = sum(probes_at_once(
            (("127.0.0.1", ["chargen"], ["udp"]),
             dict(ports=ports, timeout=TIMEOUT)),
            (("127.0.0.1", ["echo"], ["tcp"]),
             dict(ports=ports, timeout=TIMEOUT)),
            (("127.0.0.1", ["echo"], ["udp"]), dict(ports=ports, timeout=1.0)),
            (("127.0.0.1", ["chargen", "time"], ["tcp"]),
             dict(ports=ports, timeout=1.0))), [])
        verdicts = dict(((r["service"], r["transport"]), (r["verdict"],
                                                          r["detail"]))
                        for r in rows)
        self.assertEqual(len(verdicts), 5)
        self.assertEqual(verdicts["echo", "tcp"], (
            "wrong", "sent 34 bytes, none came back before the close"))
        self.assertEqual(verdicts["echo", "udp"][0], "no-reply")
        self.assertEqual(verdicts["chargen", "tcp"], (
            "wrong", "only 0 bytes before the timeout"))
        self.assertEqual(verdicts["chargen", "udp"], (
            "wrong", "not the RFC 864 ring: byte 1 is b'i' where the ring "
                     "has b'e'"))
        self.assertEqual(verdicts["time", "tcp"], (
            "wrong", "no data before the timeout"))

    def test_judging(self):
        self.assertEqual(diagsvc._judge("chargen", "udp", b"x" * 1024, b"",
                                        True),
                         ("wrong", "1024 bytes in one datagram; RFC 864 "
                                   "allows 0-512"))
        self.assertEqual(diagsvc._judge("qotd", "tcp", b"q" * 600, b"", True),
                         ("wrong", "quote of 600 characters; RFC 865 wants "
                                   "under 512"))
        self.assertEqual(diagsvc._judge("time", "udp", b"abc", b"", True),
                         ("wrong", "3 bytes; RFC 868 sends 4"))
        self.assertEqual(diagsvc._judge("echo", "tcp", b"abXd", b"abcd", True),
                         ("wrong", "echoed bytes differ from byte 2 on"))
        # A stream that starts on another line of the ring is still RFC 864.
        self.assertEqual(diagsvc._judge("chargen", "tcp",
                                        expected_chargen(97, 50), b"",
                                        False)[0], "open")
        self.assertEqual(diagsvc._judge("chargen", "tcp",
                                        expected_chargen(3), b"", True),
                         ("wrong", "only 222 bytes before the close"))
        # xinetd's ring is '!' to '}' (93 characters): wrong at its wrap.
        ring = bytes(range(33, 126))
        xinetd = b"".join((ring * 2)[i % 93:i % 93 + 72] + b"\r\n"
                          for i in range(97))
        self.assertEqual(diagsvc._judge("chargen", "tcp", xinetd, b"", False),
                         ("wrong", "not the RFC 864 ring: byte 1699 is b'!' "
                                   "where the ring has b'~'"))


class CorruptChargenServer(object):
    """A chargen server with one wrong byte at a known place."""

    def __init__(self, wrong_at):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        stream = bytearray(expected_chargen(95 * 40))
        stream[wrong_at] ^= 0x01
        self.stream = bytes(stream)
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self):
        sock, _ = self.listener.accept()
        with sock:
            try:
                while True:
                    sock.sendall(self.stream)
                    self.stream = expected_chargen(95 * 40)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        self.thread.join()


class MeasureTest(ServerTestCase):

    def test_all_tests_give_plausible_figures(self):
        server = self.start_server(max_per_source=0)
        rows = diagsvc.measure("127.0.0.1", seconds=0.3, parallel=2,
                               ports=ports_of(server))
        by_test = dict(((r["test"], r["transport"]), r) for r in rows)
        self.assertEqual(sorted(by_test), [
            ("connect", "tcp"), ("download", "tcp"), ("echo", "tcp"),
            ("latency", "tcp"), ("latency", "udp"), ("upload", "tcp")])
        for row in rows:
            self.assertGreater(row["value"], 0, row)
        self.assertEqual(by_test["download", "tcp"]["wrong_bytes"], 0)
        self.assertEqual(by_test["echo", "tcp"]["wrong_bytes"], 0)
        self.assertEqual(by_test["echo", "tcp"]["missing_bytes"], 0)
        self.assertTrue(by_test["upload", "tcp"]["drained"])
        self.assertEqual(by_test["connect", "tcp"]["errors"], 0)
        self.assertEqual(by_test["latency", "udp"]["loss_pct"], 0)
        latency = by_test["latency", "tcp"]
        self.assertTrue(latency["min_us"] <= latency["p50_us"] <=
                        latency["p99_us"] <= latency["max_us"])
        # The server saw what the client says it sent.
        self.assertEqual(server.counters["discard", "tcp"].bytes_in,
                         by_test["upload", "tcp"]["bytes"])

    def test_download_detects_a_corrupted_chargen_stream(self):
        corrupt = CorruptChargenServer(wrong_at=10000)
        self.addCleanup(corrupt.close)
        rows = diagsvc.measure("127.0.0.1", ["download"], seconds=0.3,
                               ports={"chargen": corrupt.port})
        self.assertEqual(rows[0]["wrong_bytes"], 1)
        self.assertEqual(rows[0]["first_wrong_byte"], 10000)


class ClientCommandLineTest(ServerTestCase):

    def port_options(self, server):
        return ["--port=%s=%d" % item for item in sorted(ports_of(server).items())]

    def test_probe_json_and_exit_status(self):
        server = self.start_server()
        # Its UDP discard waits out the 3 s: the other commands run meanwhile.
        full_probe = subprocess.Popen(
            [sys.executable, SCRIPT, "probe", "127.0.0.1", "--json",
             "--timeout", "3"] + list(self.port_options(server)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True)
        self.addCleanup(full_probe.wait)
        self.addCleanup(full_probe.kill)    # only if an assertion ends us early
        gone = self.start_server()
        gone.close()                        # now nothing listens there
        result = run_command("probe", "127.0.0.1", "echo", "--tcp",
                             *self.port_options(gone))
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stdout, r"(?m)^SERVICE +PROTO +ADDRESS +PORT "
                                        r"+VERDICT +RTT +DETAIL\necho +tcp +"
                                        r"127\.0\.0\.1 +\d+ +refused +- +TCP "
                                        r"reset: nothing listens\n$")
        for args in (["probe"], ["probe", "127.0.0.1", "nosuch"],
                     ["measure", "127.0.0.1", "nosuch"]):
            with self.subTest(args=args):
                result = run_command(*args)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
        # A dotted name that does not resolve is a host, not a typo: its
        # own failed row (UdpStreamReviewTest has one beside a good host).
        result = run_command("probe", "no.such.host.invalid")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("cannot resolve no.such.host.invalid", result.stdout)
        stdout, stderr = full_probe.communicate(timeout=60)
        self.assertEqual(full_probe.returncode, 0, stderr)
        rows = json.loads(stdout)
        self.assertEqual(len(rows), 12)
        self.assertEqual(set(rows[0]), {"service", "transport", "address",
                                        "port", "verdict", "rtt_ms", "detail",
                                        "host"})
        self.assertEqual(rows[0]["host"], "127.0.0.1")

    def test_measure_json(self):
        server = self.start_server(["echo", "chargen"])
        result = run_command("measure", "127.0.0.1", "latency", "download",
                             "--seconds", "0.2", "--json",
                             *self.port_options(server))
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = json.loads(result.stdout)
        self.assertEqual([(r["test"], r["transport"], r["unit"]) for r in rows],
                         [("latency", "tcp", "µs"), ("latency", "udp", "µs"),
                          ("download", "tcp", "MB/s")])
        self.assertEqual(result.stderr, "")     # no progress off a terminal

    def test_measure_table_on_an_ascii_terminal(self):
        # Python 3.6 in the C locale writes ASCII only: "us", not a crash.
        server = self.start_server(["echo"])
        environment = dict(os.environ, PYTHONIOENCODING="ascii")
        result = run_command("measure", "127.0.0.1", "latency", "--seconds",
                             "0.2", "--port", "echo=%d" %
                             server.addresses["echo", "tcp"][0][1],
                             env=environment)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\nlatency +tcp +[0-9.]+ us ")

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs a pty")
    def test_measure_shows_progress_on_a_terminal(self):
        import pty
        server = self.start_server(["echo"])
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        try:
            result = subprocess.run(
                # 0.3 s a transport: the line is shown at once, then
                # rewritten for UDP (it is shown at most each 0.25 s).
                [sys.executable, SCRIPT, "measure", "127.0.0.1", "latency",
                 "--seconds", "0.3", "--port",
                 "echo=%d" % server.addresses["echo", "tcp"][0][1]],
                stdout=subprocess.PIPE, stderr=slave, timeout=60)
        finally:
            os.close(slave)
        self.assertEqual(result.returncode, 0)
        shown = b""
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:         # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
        # One status line, rewritten in place, cleared at the end.
        self.assertIn(b"\r\x1b[Klatency tcp: ", shown)
        self.assertTrue(shown.endswith(b"\r\x1b[K"), shown[-40:])
        self.assertNotIn(b"\n", shown)
        self.assertRegex(result.stdout, rb"\nlatency +tcp +[0-9.]+ (\xc2\xb5|u)s ")


# --- The client's verdicts can be believed (issue 8, items 8-15) -------------


def silent_tcp_listener():
    """A TCP port that completes handshakes (the backlog) and never reads,
    writes or accepts: a stalled peer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


def cpu_fraction_of(code):
    """Run CODE in a child interpreter, alone, and return the CPU time it
    spent (time.process_time) as a fraction of the wall time it took.

    A child, so that no thread of this process (a server's loop) counts.
    """
    script = ("import sys, time\n"
              "sys.path.insert(0, %r)\n"
              "import diagsvc\n"
              "wall, cpu = time.monotonic(), time.process_time()\n"
              "%s\n"
              "print(time.process_time() - cpu, time.monotonic() - wall)\n"
              % (HERE, code))
    result = subprocess.run([sys.executable, "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    if result.returncode:
        raise AssertionError(result.stderr)
    cpu, wall = (float(word) for word in result.stdout.split())
    return cpu, wall


def run_in_network_namespace(test, script):
    """Run a Python SCRIPT in a new network namespace (root and unshare
    needed, else the test skips); return what it printed, as JSON."""
    import shutil
    if not ON_LINUX or os.geteuid() != 0 or not shutil.which("unshare") \
            or not shutil.which("ip"):
        test.skipTest("needs root, unshare and ip on Linux")
    setup = ("import subprocess, sys, json\n"
             "sys.path.insert(0, %r)\n"
             "import diagsvc\n" % HERE)
    result = subprocess.run(["unshare", "-n", sys.executable, "-c",
                             setup + script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=60)
    if "Operation not permitted" in result.stderr:
        test.skipTest("unshare -n is not permitted here")
    test.assertEqual(result.returncode, 0, result.stderr)
    return json.loads(result.stdout)


class ProbeRowsFailAloneTest(ServerTestCase):
    """Item 8: one failing socket costs its own row, not the whole probe."""

    def test_a_failing_address_beside_a_working_one(self):
        from unittest import mock
        server = self.start_server(["echo", "daytime"])
        targets = [(socket.AF_INET, ("255.255.255.255", 0)),
                   (socket.AF_INET, ("127.0.0.1", 0))]
        stdout = io.StringIO()
        with mock.patch.object(diagsvc, "_resolve_targets",
                               lambda host, family=None: targets), \
                mock.patch.object(sys, "stdout", stdout):
            status = diagsvc.main(["probe", "somewhere", "echo", "daytime",
                                   "--json", "--timeout", "2"] +
                                  ["--port=%s=%d" % item for item in
                                   ports_of(server).items()])
        rows = json.loads(stdout.getvalue())
        self.assertEqual(status, 1)
        self.assertEqual(len(rows), 8)
        for row in rows:
            if row["address"] == "255.255.255.255":
                # UDP connect(): EACCES, no SO_BROADCAST; TCP: unreachable.
                self.assertEqual(row["verdict"], "error", row)
                self.assertTrue(row["detail"], row)
            else:
                self.assertEqual(row["verdict"], "open", row)

    def test_probe_the_broadcast_address_gives_every_row(self):
        result = run_command("probe", "255.255.255.255", "--timeout", "0.5")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stderr, "")
        rows = result.stdout.splitlines()[1:]
        self.assertEqual(len(rows), 12, result.stdout)
        for line in rows:
            self.assertRegex(line, r"^\w+ +(tcp|udp) +255\.255\.255\.255 "
                                   r"+\d+ +error +- +\S")


class ProbeSleepsTest(ServerTestCase):
    """Item 9: probe and measure sleep while they wait."""

    def test_probe_uses_a_small_fraction_of_a_core(self):
        # UDP discard keeps the probe open for the whole timeout (1 s)
        # while the finished TCP probes' sockets stay readable (at EOF):
        # before the fix, the loop spun on them (95 % of the wall time).
        server = self.start_server()
        cpu, wall = cpu_fraction_of(
            "diagsvc.probe('127.0.0.1', ports=%r, timeout=1.0)"
            % ports_of(server))
        self.assertGreater(wall, 0.9)
        self.assertLess(cpu, 0.5 * wall, (cpu, wall))

    def test_measure_waits_asleep_on_a_stalled_path(self):
        # A discard that never reads and an echo that never answers UDP:
        # measure waits on full buffers and silent sockets, asleep.
        stalled = silent_tcp_listener()
        self.addCleanup(stalled.close)
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        # The upload's 0.5 s and its drain's 2 s (the least it waits) are
        # slept through while a thread waits 1 s on the silent UDP echo.
        cpu, wall = cpu_fraction_of(
            "import threading\n"
            "def wait_for_the_silent_echo():\n"
            "    sock = diagsvc.socket.socket(diagsvc.socket.AF_INET, "
            "diagsvc.socket.SOCK_DGRAM)\n"
            "    sock.settimeout(1.0)\n"
            "    sock.connect(('127.0.0.1', %d))\n"
            "    sock.send(b'x')\n"
            "    try:\n"
            "        sock.recv(10)\n"
            "    except diagsvc.socket.timeout:\n"
            "        pass\n"
            "silent = threading.Thread(target=wait_for_the_silent_echo)\n"
            "silent.start()\n"
            "rows = diagsvc.measure('127.0.0.1', ['upload'], seconds=0.5, "
            "timeout=1, ports={'discard': %d})\n"
            "silent.join()\n"
            "assert not rows[0]['drained'], rows\n"
            % (silent.getsockname()[1], stalled.getsockname()[1]))
        self.assertGreater(wall, 2.4)
        self.assertLess(cpu, 0.5 * wall, (cpu, wall))


class ScopedAddressTest(unittest.TestCase):
    """Item 10, the client: fe80::...%IFACE keeps its scope."""

    def test_resolution_keeps_the_scope(self):
        if not HAVE_IPV6 or not hasattr(socket, "if_nameindex"):
            self.skipTest("no IPv6, or no interface names")
        index, name = socket.if_nameindex()[0]
        (family, sockaddr), = diagsvc._resolve_targets("fe80::1%" + name)
        self.assertEqual(family, socket.AF_INET6)
        self.assertEqual(sockaddr[3], index)
        endpoint = diagsvc._endpoint(sockaddr, 7)
        self.assertEqual(endpoint[1:], (7, 0, index))
        self.assertEqual(diagsvc._shown_address(sockaddr), "fe80::1%" + name)
        self.assertEqual(diagsvc._shown_address(("fe80::1", 0, 0, index)),
                         "fe80::1%" + name)
        self.assertEqual(diagsvc._shown_address(("127.0.0.1", 0)),
                         "127.0.0.1")

    def test_probe_and_measure_a_link_local_address(self):
        # A bridge with no ports is the one link this kernel gives a
        # namespace; fe80::1 on it, without duplicate address detection.
        rows = run_in_network_namespace(self, (
            "for command in ('ip link set lo up', 'ip link add br0 type "
            "bridge', 'ip link set br0 addrgenmode none', 'ip link set br0 "
            "up', 'ip -6 addr add fe80::1/64 dev br0 nodad'):\n"
            "    subprocess.check_call(command.split())\n"
            "server = diagsvc.Server(bind=['::'], port_offset=None)\n"
            "server.start()\n"
            "ports = dict((name, server.addresses[name, 'tcp'][0][1]) for "
            "name in server.services)\n"
            # The kernel finishes setting up a new address asynchronously
            # (a work queue a loaded machine can delay): once one connect
            # has gone through, the probe's 3 s are the path's, not setup's.
            "diagsvc.socket.create_connection(('fe80::1%br0', "
            "ports['echo']), 10).close()\n"
            # The UDP discard's open|filtered is a timeout, alone in its
            # probe: a short one; the replies that must come keep 3 s.
            "rows = diagsvc.probe('fe80::1%br0', ports=ports, timeout=3, "
            "services=[name for name in diagsvc.SERVICE_NAMES if name != "
            "'discard'])\n"
            "rows += diagsvc.probe('fe80::1%br0', ['discard'], ['tcp'], "
            "ports=ports, timeout=3)\n"
            "rows += diagsvc.probe('fe80::1%br0', ['discard'], ['udp'], "
            "ports=ports, timeout=0.5)\n"
            "rows += diagsvc.probe('2001:db8::1', ['echo'], ports=ports, "
            "timeout=2)\n"
            "rows += diagsvc.measure('fe80::1%br0', ['latency'], seconds=0.2,"
            " ports=ports)\n"
            "server.close()\n"
            "print(json.dumps(rows))\n"))
        probed, unroutable, measured = rows[:12], rows[12:14], rows[14:]
        self.assertEqual(sorted((row["service"], row["transport"])
                                for row in probed),
                         sorted((name, transport)
                                for name in diagsvc.SERVICE_NAMES
                                for transport in ("tcp", "udp")))
        for row in probed:
            self.assertEqual(row["address"], "fe80::1%br0")
            self.assertIn(row["verdict"], diagsvc.PROBE_OK, row)
        self.assertEqual([(row["verdict"], row["detail"])
                          for row in unroutable],
                         [("error", "Network is unreachable")] * 2)
        self.assertEqual([(row["address"], row["transport"])
                          for row in measured],
                         [("fe80::1%br0", "tcp"), ("fe80::1%br0", "udp")])
        for row in measured:
            self.assertGreater(row["count"], 0, row)


class DiscardThatDidNotReadTest(ServerTestCase):
    """Item 11: a discard that closed without reading is not 'open'."""

    def test_denied_and_over_the_per_source_limit(self):
        real = self.start_server(["discard"])
        (row,) = diagsvc.probe("127.0.0.1", ["discard"], ["tcp"],
                               ports=ports_of(real), timeout=5)
        self.assertEqual((row["verdict"], row["detail"]),
                         ("open", "took the data, sent nothing"))
        denied = self.start_server(["discard"], deny=["127.0.0.1"])
        limited = self.start_server(["discard", "echo"], max_per_source=1)
        held = self.connect(limited, "echo")
        held.sendall(b"x")
        self.assertEqual(held.recv(1), b"x")    # admitted: the limit is full
        for refusal, server in (("denied", denied),
                                ("max-per-source", limited)):
            with self.subTest(refusal=refusal):
                (row,) = diagsvc.probe("127.0.0.1", ["discard"], ["tcp"],
                                       ports=ports_of(server), timeout=5)
                self.assertEqual(row["verdict"], "wrong", row)
                self.assertRegex(row["detail"], r"^(reset the connection|closed"
                                 r" the connection before our half-close) "
                                 r"without reading the data$")
                self.assertEqual(server.counters["discard", "tcp"].refusals,
                                 {refusal: 1})


class PercentileTest(unittest.TestCase):
    """Item 13: nearest rank, the ceil(p * n)-th smallest sample."""

    def percentiles(self, microseconds):
        return diagsvc._percentiles([value / 1e6 for value in microseconds])

    def test_known_sets(self):
        self.assertEqual(self.percentiles([2, 1]), {
            "min_us": 1.0, "p50_us": 1.0, "p90_us": 2.0, "p99_us": 2.0,
            "max_us": 2.0})
        self.assertEqual(self.percentiles(range(1, 101)), {
            "min_us": 1.0, "p50_us": 50.0, "p90_us": 90.0, "p99_us": 99.0,
            "max_us": 100.0})
        self.assertEqual(self.percentiles(range(1, 11)), {
            "min_us": 1.0, "p50_us": 5.0, "p90_us": 9.0, "p99_us": 10.0,
            "max_us": 10.0})
        # Fewer than 100 samples: p99 is the largest, by definition.
        self.assertEqual(self.percentiles(range(1, 51))["p99_us"], 50.0)
        self.assertEqual(self.percentiles(range(1, 1001))["p99_us"], 990.0)
        self.assertEqual(self.percentiles([7]), {
            "min_us": 7.0, "p50_us": 7.0, "p90_us": 7.0, "p99_us": 7.0,
            "max_us": 7.0})
        self.assertEqual(self.percentiles([]), {})


class MeasureFailuresTest(ServerTestCase):
    """Items 12 and 14: nothing through is a failure, and every wait ends."""

    def measure_command(self, *args):
        result = run_command("measure", "127.0.0.1", *(list(args) + [
            "--seconds", "0.3", "--timeout", "1"]))
        self.assertNotIn("None", result.stdout)
        self.assertNotIn("Traceback", result.stderr)
        return result

    def test_all_udp_latency_pings_lost(self):
        server = self.start_server(["echo"], transports=("tcp",))
        port = ports_of(server)["echo"]
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        try:
            silent.bind(("127.0.0.1", port))    # takes the pings, never answers
        except OSError as error:
            self.skipTest("UDP port %d is taken: %s" % (port, error))
        # The command and the call below each wait out their lost pings:
        # the command's child runs while this process measures.
        results = []
        command = threading.Thread(target=lambda: results.append(
            self.measure_command("latency", "--port", "echo=%d" % port)))
        command.start()
        try:
            rows = diagsvc.measure("127.0.0.1", ["latency"], seconds=0.3,
                                   timeout=1, ports={"echo": port})
        finally:
            command.join(90)                # run_command's own bound is 60 s
        result, = results
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertRegex(result.stdout, r"(?m)^latency +udp +- +0 round trips;"
                                        r" min - p90 - p99 - max - µs; loss "
                                        r"100\.0 %; FAILED: no round trip "
                                        r"completed$")
        self.assertRegex(result.stdout, r"(?m)^latency +tcp +[0-9.]+ µs ")
        self.assertEqual([row["value"] is None for row in rows],
                         [False, True])
        self.assertEqual(diagsvc._measure_failures(rows),
                         ["latency/udp: no round trip completed"])

    def test_download_of_nothing_and_upload_never_drained(self):
        stalled = silent_tcp_listener()
        self.addCleanup(stalled.close)
        port = stalled.getsockname()[1]
        result = self.measure_command("download", "upload", "--port",
                                      "chargen=%d" % port, "--port",
                                      "discard=%d" % port, "--json")
        self.assertEqual(result.returncode, 1, result.stdout)
        download, upload = json.loads(result.stdout)
        self.assertEqual(download["bytes"], 0)
        self.assertFalse(upload["drained"])
        self.assertEqual(diagsvc._measure_failures([download, upload]), [
            "download/tcp: no bytes got through",
            "upload/tcp: not drained: the server did not close after our "
            "half-close"])

    def test_upload_to_a_discard_port_that_streams_ends(self):
        # --port discard=19 against a chargen: the drain used to read its
        # stream forever.  Now one deadline bounds it (seconds + timeout,
        # at least 2 s); a hang is what this guards against, so the bound
        # here is generous.
        server = self.start_server(["chargen"])
        result = self.measure_command("upload", "--port", "discard=%d" %
                                      ports_of(server)["chargen"])
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertRegex(result.stdout, r"(?m)^upload +tcp +[0-9.]+ MB/s +"
                                        r"[0-9.]+ MB in [0-9.]+ s; not "
                                        r"drained; FAILED: discard sent \d+ "
                                        r"bytes back; FAILED: not drained")


class TricklingEchoServer(object):
    """An echo that returns each byte a while after the one before: every
    recv() gets something, so only an overall deadline ends a wait."""

    def __init__(self, pause):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.pause = pause
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self):
        self.listener.settimeout(TIMEOUT)
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        with sock:
            try:
                for byte in iter(lambda: sock.recv(1), b""):
                    if self.stop.wait(self.pause):
                        break
                    sock.sendall(byte)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.listener.close()
        self.thread.join()


class LatencyWaitTest(unittest.TestCase):
    """Item 14: one latency round trip waits at most the timeout."""

    def test_an_echo_that_trickles_times_out(self):
        echo = TricklingEchoServer(pause=0.2)
        self.addCleanup(echo.close)
        # 32 bytes at 0.2 s each is 6.4 s; the timeout is 1 s.
        result = run_command("measure", "127.0.0.1", "latency", "--seconds",
                             "0.1", "--timeout", "1", "--port",
                             "echo=%d" % echo.port)
        self.assertEqual(result.returncode, 1, result.stdout)
        # The TCP row fails alone (the UDP row has its own fate: nothing
        # listens there, or something else does).
        self.assertEqual(result.stderr, "")
        self.assertRegex(result.stdout, r"(?m)^latency +tcp +- +0 round "
                                        r"trips; .*; FAILED: timed out$")


# --- The client after an outside review (issue 8, review of items 8-15) -----


def run_python(code):
    """Run CODE in a child interpreter that has imported diagsvc: a call that
    hangs fails the test at the subprocess timeout, not the whole suite."""
    return subprocess.run(
        [sys.executable, "-c", "import sys\nsys.path.insert(0, %r)\n"
         "import diagsvc\n%s" % (HERE, code)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


class FiniteDurationTest(ServerTestCase):
    """A timeout or a duration is a finite number above 0: nan never ended
    a probe, inf crashed select(), 0 called every port filtered."""

    def test_client_options_refuse_zero_nan_and_inf(self):
        for args, text in (
                (["probe", "--timeout", "nan"], "--timeout: 'nan' is not"),
                (["probe", "--tcp", "--timeout", "inf"], "'inf' is not a"),
                (["probe", "--timeout", "0"], "'0' is not a number > 0"),
                (["measure", "--seconds", "nan"], "--seconds: 'nan' is not"),
                (["measure", "--seconds", "inf"], "'inf' is not a number"),
                (["measure", "--timeout", "nan"], "--timeout: 'nan' is not"),
                (["measure", "--timeout", "0"], "'0' is not a number > 0")):
            with self.subTest(args=args):
                # The usage error comes before any socket (before the fix,
                # --timeout nan hung here until the subprocess timeout).
                result = run_command(args[0], "127.0.0.1", *(args[1:] + [
                    "echo" if args[0] == "probe" else "latency"]))
                self.assertEqual(result.returncode, 2, result.stdout)
                self.assertEqual(result.stdout, "")
                self.assertNotIn("Traceback", result.stderr)
                last = result.stderr.splitlines()[-1]
                self.assertIn(text, last)
                self.assertTrue(last.startswith("diagsvc %s: error: argument "
                                                % args[0]), last)

    def test_server_options_refuse_nan_and_inf(self):
        from unittest import mock
        for option in ("--idle-timeout", "--udp-rate", "--udp-echo-rate"):
            for value in ("nan", "inf", "-inf"):
                with self.subTest(option=option, value=value):
                    stderr = io.StringIO()
                    with mock.patch.object(sys, "stderr", stderr), \
                            self.assertRaises(SystemExit) as stop:
                        diagsvc._build_parser().parse_args(
                            ["--bind", "127.0.0.1", option + "=" + value])
                    self.assertEqual(stop.exception.code, 2)
                    self.assertIn("%r is not a number >= 0" % value,
                                  stderr.getvalue())

    def test_probe_and_measure_raise_value_error(self):
        server = self.start_server(["echo"])
        result = run_python(
            "calls = [('probe', 'timeout', 0), ('probe', 'timeout', 'inf'),\n"
            "         ('measure', 'seconds', 0), ('measure', 'seconds', 'nan'),\n"
            "         ('measure', 'timeout', 'inf'),\n"
            "         ('measure', 'timeout', 'nan'), ('probe', 'timeout', 'nan')]\n"
            "for function, name, value in calls:\n"
            "    try:\n"
            "        getattr(diagsvc, function)('127.0.0.1', ports={'echo': %d},\n"
            "            **{name: float(value), 'tests' if function == 'measure'\n"
            "               else 'services': ['echo']})\n"
            "    except ValueError as error:\n"
            "        print(function, error)\n"
            "    else:\n"
            "        print(function, 'returned')\n"
            "    sys.stdout.flush()\n" % ports_of(server)["echo"])
        self.assertEqual(result.stdout.splitlines(), [
            "probe timeout must be a finite number above 0, not 0.0",
            "probe timeout must be a finite number above 0, not inf",
            "measure seconds must be a finite number above 0, not 0.0",
            "measure seconds must be a finite number above 0, not nan",
            "measure timeout must be a finite number above 0, not inf",
            "measure timeout must be a finite number above 0, not nan",
            "probe timeout must be a finite number above 0, not nan"],
            result.stderr)


class FakeStreamServer(object):
    """A TCP server whose every connection gets DATA, then a close ('close'),
    a reset ('reset'), or silence until close() ('stall'); with 'none', it
    accepts and closes at once without reading (as diagsvc does for
    --deny)."""

    def __init__(self, ending, data=b""):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.ending = ending
        self.data = data
        self.stop = threading.Event()
        self.threads = []
        self.accepter = threading.Thread(target=self.accept)
        self.accepter.start()

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:             # closed: the test is over
                return
            thread = threading.Thread(target=self.serve, args=(sock,))
            thread.start()
            self.threads.append(thread)

    def serve(self, sock):
        with sock:
            try:
                if self.ending != "none":
                    sock.sendall(self.data)
                if self.ending == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                elif self.ending == "stall":
                    self.stop.wait(TIMEOUT * 3)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        # shutdown() wakes accept() in its thread on Linux; close() alone
        # may not.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.accepter.join()
        for thread in self.threads:
            thread.join()


class StreamEndedEarlyTest(ServerTestCase):
    """A stream that the server ends early, or that stalls, is a failure,
    with when and how; a rate is over the window, never over a burst."""

    def fake(self, ending, size=0):
        server = FakeStreamServer(ending, expected_chargen(size // 74 + 1)
                                  [:size])
        self.addCleanup(server.close)
        return server

    def assert_rate_over_window(self, row, seconds):
        self.assertGreaterEqual(row["seconds"], seconds, row)
        self.assertEqual(row["value"], round(row["bytes"] / 1e6 /
                                             max(seconds, row["seconds"]), 1))
        # A few MB at most (what the buffers took), over 1 s or more.
        self.assertLess(row["value"], 50, row)

    def test_download_from_a_chargen_that_closes_resets_or_stalls(self):
        for ending in ("close", "reset", "stall"):
            with self.subTest(ending=ending):
                chargen = self.fake(ending, 500000)
                # Only a stall needs a timeout shorter than the window; a
                # connect on a loaded machine must not trip the others.
                rows = diagsvc.measure("127.0.0.1", ["download"], seconds=1.5,
                                       parallel=2,
                                       timeout=0.5 if ending == "stall"
                                       else TIMEOUT,
                                       ports={"chargen": chargen.port})
                row = rows[0]
                if ending == "reset" and "error" in row:
                    # On a loaded machine the reset can come before our
                    # connect() returns: the test then fails as a whole,
                    # with the reset as its reason (exit 1 all the same).
                    self.assertEqual(row["error"], "Connection reset by peer")
                    self.assertIn("download/tcp: Connection reset by peer",
                                  diagsvc._measure_failures(rows))
                    continue
                self.assertNotIn("error", row, row)
                self.assertEqual(row["ended_early"], 2, row)
                self.assertEqual(row["ended_how"], {
                    "close": "closed by the server",
                    "reset": "reset by the server",
                    "stall": "stalled"}[ending])
                self.assertLess(row["ended_at_s"], 1.0, row)
                if ending != "reset":   # a reset may drop what was in flight
                    self.assertEqual(row["bytes"], 1000000)
                    self.assertEqual(row["wrong_bytes"], 0)
                self.assert_rate_over_window(row, 1.5)
                self.assertIn("download/tcp: 2 of 2 connections ended early; "
                              "the first: %s at %.2f s" % (
                                  row["ended_how"], row["ended_at_s"]),
                              diagsvc._measure_failures(rows))

    def test_a_real_chargen_does_not_end_early(self):
        server = self.start_server(["chargen", "discard", "echo"])
        rows = diagsvc.measure("127.0.0.1", ["download", "upload", "echo"],
                               seconds=0.3, parallel=2, ports=ports_of(server))
        self.assertEqual([row["ended_early"] for row in rows], [0, 0, 0])
        self.assertEqual(diagsvc._measure_failures(rows), [])

    def test_upload_and_echo_to_a_server_that_closes_at_once(self):
        closer = self.fake("none")
        rows = diagsvc.measure("127.0.0.1", ["upload", "echo"], seconds=1,
                               timeout=1, ports={"discard": closer.port,
                                                 "echo": closer.port})
        self.assertEqual([(row["test"], row["ended_early"]) for row in rows],
                         [("upload", 1), ("echo", 1)], rows)
        failures = diagsvc._measure_failures(rows)
        for row in rows:
            with self.subTest(test=row["test"]):
                self.assertNotIn("error", row)
                self.assertIn(row["ended_how"], ("closed by the server",
                                                 "reset by the server"))
                self.assertIn("%s/tcp: the connection ended early: %s at "
                              "%.2f s" % (row["test"], row["ended_how"],
                                          row["ended_at_s"]), failures)
                self.assert_rate_over_window(row, 1)
        self.assertFalse(rows[0]["drained"])
        # It closed before our half-close: no word of one.
        self.assertNotIn("half-close", " ".join(failures))


class MeasureTestsFailAloneTest(ServerTestCase):
    """One test that cannot run costs its own row, not the run."""

    def test_a_refused_echo_between_a_download_and_a_connect(self):
        server = self.start_server(["chargen", "daytime"])
        refusing = socket.socket()          # bound, not listening: a reset
        self.addCleanup(refusing.close)
        refusing.bind(("127.0.0.1", 0))
        port = refusing.getsockname()[1]
        options = ["--port=%s=%d" % item for item in
                   sorted(ports_of(server).items())] + [
            "--port", "echo=%d" % port, "--seconds", "0.3"]
        result, table = run_commands_at_once(
            ["measure", "127.0.0.1", "download", "echo", "connect", "--json"]
            + options,
            ["measure", "127.0.0.1", "download", "echo", "connect"] + options)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stderr, "")
        download, echo, connect = json.loads(result.stdout)
        self.assertEqual(echo, {"test": "echo", "transport": "tcp",
                                "host": "127.0.0.1",
                                "address": "127.0.0.1", "port": port,
                                "value": None, "error": "Connection refused"})
        self.assertGreater(download["bytes"], 0)
        self.assertGreater(connect["count"], 0)
        self.assertEqual(diagsvc._measure_failures([download, echo, connect]),
                         ["echo/tcp: Connection refused"])
        result = table
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertRegex(result.stdout, r"(?m)^echo +tcp +- +port %d; "
                                        r"FAILED: Connection refused$" % port)
        self.assertRegex(result.stdout, r"(?m)^download +tcp +[0-9.]+ MB/s ")
        self.assertRegex(result.stdout, r"(?m)^connect +tcp +[0-9.]+ conn/s ")


class GarblingEchoServer(object):
    """An echo on one port, TCP and UDP, that changes the last byte of what
    it returns ('\\n' -> 'x'), as a broken middlebox might."""

    def __init__(self, test):
        for _ in range(10):
            self.tcp = socket.socket()
            self.tcp.bind(("127.0.0.1", 0))
            self.port = self.tcp.getsockname()[1]
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                self.udp.bind(("127.0.0.1", self.port))
                break
            except OSError:             # taken for UDP: another port
                self.tcp.close()
                self.udp.close()
        else:
            test.skipTest("no port free on both transports")
        self.tcp.listen(1)
        self.tcp.settimeout(TIMEOUT)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.serve_tcp),
                        threading.Thread(target=self.serve_udp)]
        for thread in self.threads:
            thread.start()

    def serve_tcp(self):
        try:
            sock, _ = self.tcp.accept()
        except OSError:
            return
        with sock:
            try:
                for data in iter(lambda: sock.recv(65536), b""):
                    sock.sendall(data.replace(b"\n", b"x"))
            except OSError:
                pass

    def serve_udp(self):
        self.udp.settimeout(0.1)        # to see stop
        while not self.stop.is_set():
            try:
                data, peer = self.udp.recvfrom(65536)
                self.udp.sendto(data[:-1] + b"x", peer)
            except (socket.timeout, ConnectionRefusedError):
                pass
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.tcp.close()
        for thread in self.threads:
            thread.join()
        self.udp.close()


class LatencyWrongReplyTest(unittest.TestCase):
    """A garbled latency reply is counted as wrong: no crash, exit 1."""

    def test_garbled_replies_over_tcp_and_udp(self):
        echo = GarblingEchoServer(self)
        self.addCleanup(echo.close)
        rows = diagsvc.measure("127.0.0.1", ["latency"], seconds=0.3,
                               timeout=1, ports={"echo": echo.port})
        for row in rows:
            with self.subTest(transport=row["transport"]):
                self.assertEqual(row["count"], 0, row)
                self.assertGreater(row["wrong_replies"], 0, row)
                self.assertNotIn("error", row)
        self.assertEqual(rows[1]["loss_pct"], 0.0)
        self.assertEqual(diagsvc._measure_failures(rows), [
            "latency/tcp: no round trip completed",
            "latency/tcp: %d replies were not the ping's echo"
            % rows[0]["wrong_replies"],
            "latency/udp: no round trip completed",
            "latency/udp: %d replies were not the ping's echo"
            % rows[1]["wrong_replies"]])

    def test_the_command_exits_1_with_the_count(self):
        echo = GarblingEchoServer(self)
        self.addCleanup(echo.close)
        result = run_command("measure", "127.0.0.1", "latency", "--seconds",
                             "0.3", "--timeout", "1", "--port",
                             "echo=%d" % echo.port)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stderr, "")
        for transport in ("tcp", "udp"):
            self.assertRegex(result.stdout, r"(?m)^latency +%s +- +0 round "
                                            r"trips; .*; wrong replies (\d+); "
                                            r"FAILED: no round trip completed; "
                                            r"FAILED: \1 replies were not the "
                                            r"ping's echo$" % transport)


class IntermixedArgumentsTest(ServerTestCase):
    """Item 15: options and positionals in any order, on 3.6 too."""

    def test_probe_and_measure_take_options_after_positionals(self):
        server = self.start_server(["echo"])
        port = "--port=echo=%d" % ports_of(server)["echo"]
        probed, measured, bogus = run_commands_at_once(
            ["probe", "127.0.0.1", "--tcp", "echo", port, "--json"],
            ["measure", "127.0.0.1", "--seconds", "0.2", "latency", port,
             "--json"],
            ["probe", "127.0.0.1", "echo", "--bogus", "echo"])
        result = probed
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([(row["service"], row["transport"])
                          for row in json.loads(result.stdout)],
                         [("echo", "tcp")])
        result = measured
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([row["test"] for row in json.loads(result.stdout)],
                         ["latency", "latency"])
        result = bogus
        self.assertEqual(result.returncode, 2)
        self.assertIn("unrecognized arguments: --bogus", result.stderr)

    def test_the_server_takes_options_after_positionals(self):
        server = ServerProcess("echo", "--tcp", "chargen", "--bind",
                               "127.0.0.1", "--port", "echo=0", "--port",
                               "chargen=0")
        self.addCleanup(server.kill)
        self.assertEqual(sorted(server.addresses), [("chargen", "tcp"),
                                                    ("echo", "tcp")])
        server.stop()


# --- measure udp, loaded, mtu; intervals and thresholds ---------------------


STREAM_HEADER = struct.Struct("!4sIQd")     # the README's layout, written out


class MischievousEcho(object):
    """A UDP echo server that misbehaves on purpose, by sequence number.

    Drops every datagram whose number ends in 9; echoes those divisible by
    7 twice; holds each number ending in 4 until the next one has been
    echoed (a swapped pair); holds number 10 for `late_hold` seconds (a late
    reply).  It records the sequence numbers and send times it saw.
    """

    def __init__(self, late_hold=None, mischief=True):
        self.mischief = mischief
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.late_hold = late_hold
        self.seen = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def echo(self, data, source, sequence):
        for _ in range(2 if sequence % 7 == 0 else 1):
            self.sock.sendto(data, source)

    def serve(self):
        swapped = None
        late = None
        while not self.stop.is_set():
            wait = 0.05
            if late is not None:
                wait = max(0.0, min(wait, late[0] - time.monotonic()))
            if select.select([self.sock], [], [], wait)[0]:
                data, source = self.sock.recvfrom(70000)
                _, _, sequence, sent_at = STREAM_HEADER.unpack_from(data)
                self.seen.append((sequence, sent_at, source[1]))
                if not self.mischief:
                    self.sock.sendto(data, source)
                elif sequence % 10 == 9:
                    pass
                elif sequence == 10 and self.late_hold is not None:
                    late = (time.monotonic() + self.late_hold, data, source)
                elif sequence % 10 == 4:
                    swapped = (data, source, sequence)
                else:
                    self.echo(data, source, sequence)
                    if swapped is not None:
                        self.echo(*swapped)
                        swapped = None
            if late is not None and time.monotonic() >= late[0]:
                self.echo(late[1], late[2], 10)
                late = None

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


class UdpStreamTest(ServerTestCase):

    def test_payload_layout_round_trip(self):
        data = diagsvc.stream_datagram(0x01020304, 2 ** 40 + 5, 12.5, 64)
        self.assertEqual(len(data), 64)
        self.assertEqual(data[:24], b"dsv1\x01\x02\x03\x04" +
                         struct.pack("!Q", 2 ** 40 + 5) +
                         struct.pack("!d", 12.5))
        self.assertEqual(data[24:], bytes(40))
        self.assertEqual(diagsvc.parse_stream_datagram(data),
                         (0x01020304, 2 ** 40 + 5, 12.5))
        smallest = diagsvc.stream_datagram(7, 0, 1.0, 0)
        self.assertEqual(len(smallest), diagsvc.STREAM_MIN_SIZE)
        self.assertEqual(diagsvc.STREAM_MIN_SIZE, 24)
        self.assertEqual(diagsvc.parse_stream_datagram(smallest), (7, 0, 1.0))
        for wrong in (b"", smallest[:23], b"xsv1" + smallest[4:]):
            self.assertIsNone(diagsvc.parse_stream_datagram(wrong))

    def test_rate_bitrate_and_size(self):
        v4, v6 = socket.AF_INET, socket.AF_INET6
        self.assertEqual(diagsvc._stream_rate(None, None, None, v4),
                         (100.0, 64))
        self.assertEqual(diagsvc._stream_rate(None, 1e6, 1250, v4),
                         (100.0, 1250))
        self.assertEqual(diagsvc._stream_rate(1000, 8e6, None, v4),
                         (1000.0, 1000))
        self.assertEqual(diagsvc._stream_rate(10, None, 65527, v6),
                         (10.0, 65527))
        for arguments in ((1, 1, 100), (None, None, 23), (None, None, 65508),
                          (1, 8 * 70000, None)):
            with self.assertRaises(ValueError):
                diagsvc._stream_rate(*(arguments + (v4,)))

    def test_loss_duplicates_reordering_and_late_replies(self):
        echo = MischievousEcho(late_hold=1.05)
        self.addCleanup(echo.close)
        # 200 datagrams in 0.5 s (short on purpose: the sending window is
        # not what is tested); a reply is late after 1 s, kept long so that
        # no reply of a loaded machine is late by accident.  Number 10 comes
        # back 1.05 s after it left (late whatever the load), long before
        # the client stops listening (2 * 1 s after its last send).
        rows = diagsvc.measure("127.0.0.1", ["udp"], seconds=0.5,
                               rate=400, timeout=1.0,
                               ports={"echo": echo.port})
        self.assertEqual(len(rows), 1)
        row = rows[0]
        self.assertEqual([entry[0] for entry in echo.seen],
                         list(range(200)))
        self.assertEqual(row["sent"], 200)
        self.assertEqual(row["lost"], 20)           # 9, 19, ... 199
        self.assertEqual(row["loss_pct"], 10.0)
        self.assertEqual(row["late"], 1)            # 10
        self.assertEqual(row["late_after_s"], 1.0)
        self.assertEqual(row["received"], 179)
        # 0, 7, ... 196 less 49, 119 and 189, which were dropped.
        self.assertEqual(row["duplicated"], 26)
        # 4, 14, ... 194 behind their successors, and 10 behind them all.
        self.assertEqual(row["reordered"], 21)
        self.assertEqual(row["foreign"], 0)
        self.assertEqual(row["flow"], "total")
        self.assertEqual((row["test"], row["transport"], row["unit"],
                          row["value"]), ("udp", "udp", "% loss", 10.0))
        self.assertTrue(row["min_us"] <= row["p50_us"] <= row["p90_us"] <=
                        row["p99_us"] <= row["max_us"] < 1e6)
        self.assertEqual(row["pdv_us"], round(row["p99_us"] -
                                              row["min_us"], 1))
        self.assertGreater(row["ipdv_mean_us"], 0)

    def test_figures_arithmetic(self):
        tally = diagsvc._StreamTally(6)
        tally.sent = 6
        # 0 and 1 in order, 3 before 2, 3 twice, 5 late, 4 lost, 9 unknown.
        for sequence, rtt in ((0, 0.001), (1, 0.003), (3, 0.002), (2, 0.006),
                              (3, 0.002), (5, 2.5), (9, 0.001)):
            tally.arrived(sequence, rtt)
        row = diagsvc._stream_figures([tally], 2.0)
        self.assertEqual(
            dict((key, row[key]) for key in (
                "sent", "received", "lost", "late", "duplicated",
                "reordered", "foreign", "min_us", "max_us")),
            {"sent": 6, "received": 4, "lost": 1, "late": 1,
             "duplicated": 1, "reordered": 1, "foreign": 1,
             "min_us": 1000.0, "max_us": 6000.0})
        # RFC 3393 pairs (0,1), (1,2), (2,3): |3-1|, |6-3|, |2-6| ms.
        self.assertEqual(row["ipdv_mean_us"], 3000.0)
        self.assertEqual(row["pdv_us"], row["p99_us"] - 1000.0)

    def test_tally_edges(self):
        tally = diagsvc._StreamTally(4)
        tally.sent = 2
        tally.arrived(2, 0.001)         # the next number: not sent yet
        self.assertEqual((tally.foreign, tally.arrivals), (1, 0))
        tally.arrived(0, 0.5)           # exactly the wait: on time
        self.assertEqual(tally.on_time(0.5), [0.5, -1.0])

    def test_ipdv_pairs_neighbours_only(self):
        tally = diagsvc._StreamTally(4)
        tally.sent = 4
        for sequence, rtt in enumerate((0.001, 0.002, 0.004, 0.008)):
            tally.arrived(sequence, rtt)
        # |2-1|, |4-2|, |8-4| ms.
        self.assertEqual(diagsvc._stream_figures([tally], 1.0)[
            "ipdv_mean_us"], round(7000.0 / 3, 1))

    def test_smallest_size_is_the_header(self):
        self.assertEqual(diagsvc._stream_rate(None, None,
                                              diagsvc.STREAM_MIN_SIZE,
                                              socket.AF_INET),
                         (100.0, diagsvc.STREAM_MIN_SIZE))

    def test_a_flow_counts_another_flows_reply_as_foreign(self):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(peer.close)
        peer.bind(("127.0.0.1", 0))
        flow = diagsvc._UdpFlow(socket.AF_INET, ("127.0.0.1", 0),
                                peer.getsockname()[1], 5, 0, 4, 64, None)
        self.addCleanup(flow.sock.close)
        flow.tally.sent = 1
        buffer = bytearray(65536)
        for flow_id in (6, 5):
            peer.sendto(diagsvc.stream_datagram(flow_id, 0,
                                                time.perf_counter(), 64),
                        flow.sock.getsockname())
            select.select([flow.sock], [], [], TIMEOUT)
            flow.read_replies(buffer, time.perf_counter)
        self.assertEqual((flow.tally.foreign, flow.tally.arrivals), (1, 1))

    def test_pacing_follows_the_clock(self):
        echo = MischievousEcho(mischief=False)
        self.addCleanup(echo.close)
        # 0.3 s, short on purpose: 60 datagrams paced over it are still
        # many times as long as a burst (a few ms).
        rows = diagsvc.measure("127.0.0.1", ["udp"], seconds=0.3, rate=200,
                               timeout=0.2, ports={"echo": echo.port})
        row = rows[0]
        self.assertEqual(row["sent"], 60)
        self.assertEqual(row["rate_asked_pps"], 200.0)
        self.assertTrue(180 <= row["rate_sent_pps"] <= 220, row)
        self.assertFalse(row["client_limited"])
        # Paced, not a burst: number k leaves k/200 s after the start at the
        # earliest, whatever the load on this machine (59/200 s > 0.15 s).
        sent_at = [entry[1] for entry in sorted(echo.seen)]
        self.assertEqual(len(sent_at), 60)
        self.assertGreater(sent_at[-1] - sent_at[0], 0.15)
        self.assertEqual(sent_at, sorted(sent_at))

    def test_parallel_flows_have_their_own_ports_and_rows(self):
        echo = MischievousEcho(mischief=False)
        self.addCleanup(echo.close)
        # 30 datagrams a flow in 0.1 s: the window is not what is tested.
        rows = diagsvc.measure("127.0.0.1", ["udp"], seconds=0.1, rate=900,
                               parallel=3, ports={"echo": echo.port})
        self.assertEqual([row["flow"] for row in rows], [1, 2, 3, "total"])
        self.assertEqual([row["sent"] for row in rows], [30, 30, 30, 90])
        self.assertEqual([row["rate_asked_pps"] for row in rows],
                         [300.0, 300.0, 300.0, 900.0])
        for row in rows:
            self.assertEqual((row["received"], row["lost"], row["late"]),
                             (row["sent"], 0, 0), row)
        by_port = {}
        for sequence, _, port in echo.seen:
            by_port.setdefault(port, []).append(sequence)
        self.assertEqual(sorted(by_port.values()), [list(range(30))] * 3)

    def test_against_diagsvc_on_each_family(self):
        for host, _ in FAMILIES:
            with self.subTest(host=host):
                server = self.start_server(["echo"], host=host)
                # 30 datagrams in 0.1 s: the window is not what is tested.
                rows = diagsvc.measure(host, ["udp"], seconds=0.1, rate=300,
                                       size=1000,
                                       ports=ports_of(server, "udp"))
                self.assertEqual((rows[0]["sent"], rows[0]["received"],
                                  rows[0]["size_bytes"], rows[0]["address"]),
                                 (30, 30, 1000, host))
                counters = server.counters["echo", "udp"]
                self.assertEqual((counters.datagrams, counters.bytes_in),
                                 (30, 30000))


def namespace_run(test, setup, code, timeout=60):
    """Run `code` (Python, with diagsvc importable) in a new network
    namespace after the shell commands `setup`; its stdout, parsed as JSON.
    Skips unless root on Linux with unshare, ip (and nft or tc if used)."""
    import shutil
    if not ON_LINUX or os.geteuid() != 0:
        test.skipTest("needs root on Linux for a network namespace")
    for tool in ("unshare", "ip", "nft", "tc"):
        if (tool in ("unshare", "ip") or
                any(command.startswith(tool + " ") for command in setup)) \
                and shutil.which(tool) is None:
            test.skipTest("needs %s" % tool)
    if subprocess.run(["unshare", "-n", "true"]).returncode:
        test.skipTest("unshare -n is not allowed here")
    import shlex
    script = " && ".join(["ip link set lo up"] + list(setup) + [
        "exec %s -c %s" % (shlex.quote(sys.executable), shlex.quote(
            "import sys; sys.path.insert(0, %r)\n" % HERE + code))])
    result = subprocess.run(["unshare", "-n", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=timeout)
    test.assertEqual(result.returncode, 0, result.stderr)
    return json.loads(result.stdout)


# In a fresh namespace every port is free: the servers use fixed ones.
# measure()'s arguments, with "host" (default 127.0.0.1) the one address
# the server binds.
NAMESPACE_MEASURE = """
import json, subprocess, sys
import diagsvc
options = %%r
host = options.pop("host", "127.0.0.1")
server = subprocess.Popen(
    [sys.executable, %r, "echo", "chargen", "discard", "--bind", host,
     "--port-offset", "20000", "--max-per-source", "0"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
try:
    for line in server.stdout:
        if line.startswith("diagsvc: running as"):
            break
    rows = diagsvc.measure(host, port_offset=20000, **options)
    print(json.dumps(rows))
finally:
    server.terminate()
    server.wait()
""" % SCRIPT


def main_in_process(*argv):
    """(exit status, stdout, stderr) of diagsvc.main(argv), in this process."""
    from unittest import mock
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "stdout", stdout), \
            mock.patch.object(sys, "stderr", stderr):
        status = diagsvc.main(list(argv))
    return status, stdout.getvalue(), stderr.getvalue()


class FailingSendSocket(object):
    """Stands in for a flow's socket behind a local firewall: send() fails
    with EPERM, as an nftables 'drop' in the output chain makes it."""

    def send(self, data):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def close(self):
        pass


class UdpStreamReviewTest(unittest.TestCase):
    """The outside review of issue 11's udp test: refusals, the late
    window, failed sends, hosts that do not resolve."""

    def test_a_huge_rate_or_bitrate_is_a_usage_error(self):
        # Was: OverflowError (array * 10**297) or MemoryError (1e9 pps).
        for options in (["--bitrate", "1e300"],
                        ["--rate", "2000001", "--seconds", "5"]):
            status, _, stderr = main_in_process(
                "measure", "127.0.0.1", "udp", "--port", "echo=9", *options)
            self.assertEqual(status, 2, stderr)
            self.assertRegex(stderr, r"^diagsvc measure: error: .* above "
                                     r"the udp test's limit of 10000000 "
                                     r"datagrams\n$")
        self.assertEqual(diagsvc._stream_plan(2e6, 5.0, 1), 10 ** 7)

    def test_a_derived_size_out_of_range_is_refused(self):
        # 1000 bits at 1000 pps is 0 bytes a datagram: not the 64 default.
        for bitrate in (1000, 8 * 65508 * 10):
            with self.assertRaises(ValueError):
                diagsvc._stream_rate(10 if bitrate > 1000 else 1000, bitrate,
                                     None, socket.AF_INET)

    def test_fewer_datagrams_than_flows_is_a_usage_error(self):
        status, _, stderr = main_in_process(
            "measure", "127.0.0.1", "udp", "--parallel", "4", "--rate", "2",
            "--seconds", "1", "--port", "echo=9")
        self.assertEqual(status, 2, stderr)
        self.assertIn("2 datagrams, fewer than the 4 flows", stderr)

    def test_the_last_datagram_can_be_late_too(self):
        # 11 datagrams; the last (10) comes back 0.12 s after it left, later
        # than the 0.11 s timeout: late, as it would be mid-stream, and not
        # lost (the client listens until 0.22 s after the last send).
        echo = MischievousEcho(late_hold=0.12)
        self.addCleanup(echo.close)
        row = diagsvc.measure("127.0.0.1", ["udp"], seconds=0.0275, rate=400,
                              timeout=0.11, ports={"echo": echo.port})[0]
        self.assertEqual(row["sent"], 11)
        self.assertEqual(row["lost"], 1)            # 9, dropped
        self.assertGreaterEqual(row["late"], 1)     # 10 at least
        self.assertEqual(row["received"] + row["late"], 10)

    def test_failed_sends_are_lost_and_not_client_limited(self):
        flow = diagsvc._UdpFlow(socket.AF_INET, ("127.0.0.1", 0), 9, 1, 0,
                                3, 64, None)
        flow.sock.close()
        flow.sock = FailingSendSocket()
        for _ in range(3):
            flow.send_next(0.0)
        row = diagsvc._udp_rows([flow], 3.0, 64, 1.0, 1.0, 0.0)[0]
        # Was: sent 0, 0.0 % loss and client_limited.
        self.assertEqual((row["sent"], row["lost"], row["loss_pct"],
                          row["client_limited"], row["errors"]),
                         (3, 3, 100.0, False, {"Operation not permitted": 3}))
        self.assertEqual(row["send_failed"], 3)

    def test_an_unresolvable_host_is_its_own_row(self):
        echo = MischievousEcho(mischief=False)
        self.addCleanup(echo.close)
        status, stdout, stderr = main_in_process(
            "measure", "127.0.0.1", "no.such.host.invalid", "udp", "--json",
            "--rate", "20", "--seconds", "0.05", "--timeout", "1",
            "--port", "echo=%d" % echo.port)
        self.assertEqual(status, 1, stderr)
        rows = json.loads(stdout)
        self.assertEqual([(row["host"], row["test"]) for row in rows],
                         [("127.0.0.1", "udp"),
                          ("no.such.host.invalid", "-")])
        self.assertEqual(rows[0]["received"], 1)
        self.assertRegex(rows[1]["error"], "^cannot resolve "
                                           "no.such.host.invalid: ")
        status, stdout, stderr = main_in_process(
            "probe", "no.such.host.invalid", "127.0.0.1", "echo", "--udp",
            "--json", "--port", "echo=%d" % echo.port)
        self.assertEqual(status, 1, stderr)
        self.assertEqual([(row["host"], row["verdict"]) for row in
                          json.loads(stdout)],
                         [("no.such.host.invalid", "error"),
                          ("127.0.0.1", "open")])
        # A lone word is still a usage error: a mistyped test name.
        self.assertEqual(main_in_process("measure", "127.0.0.1", "udpp")[0],
                         2)


class FirewalledSocket(object):
    """A socket whose sends above `limit` bytes fail with EPERM, as behind
    an nftables 'meta length gt N drop' in the output chain."""

    def __init__(self, sock, limit):
        self.sock, self.limit = sock, limit

    def send(self, data):
        if len(data) > self.limit:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return self.sock.send(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


class MtuLocalFilterTest(unittest.TestCase):
    """Review of issue 11: EPERM from a local firewall is an outcome of the
    mtu search, not the end of it."""

    def test_a_local_firewall_is_named_and_the_search_goes_on(self):
        echo = MischievousEcho(mischief=False)
        self.addCleanup(echo.close)
        probe = diagsvc._MtuProbe(socket.AF_INET, ("127.0.0.1", 0),
                                  echo.port, False, 2.0,
                                  diagsvc._Progress(False), 7)
        self.addCleanup(probe.close)
        probe.sock = FirewalledSocket(probe.sock, 1200)
        passed, failed, failure, _ = diagsvc._mtu_search(probe.attempt, 24,
                                                         2000)
        self.assertEqual((passed, failed, failure), (1200, 1201, "filtered"))
        row, text = diagsvc._mtu_verdict(passed, failed, failure, 65536, 28,
                                         "untested", True)
        self.assertEqual(row["limit"], "local-filter")
        self.assertIn("1201 bytes and more are refused by this host's "
                      "firewall", text)
        row, _ = diagsvc._mtu_verdict(None, 24, "filtered", 65536, 28,
                                      "untested", True)
        self.assertEqual(row["limit"], "local-filter")

    def test_no_fragment_probe_when_nothing_would_fragment(self):
        # Loopback (MTU 65,536) with a filter above 1,200 bytes: the largest
        # datagram fits the MTU unfragmented, so 'fragmented' is untested,
        # not 'lost'.
        size = diagsvc._fragment_probe_size
        self.assertIsNone(size(1201, 65536, 28, 65507))
        self.assertEqual(size(1201, 1500, 28, 65507), 1473)
        self.assertEqual(size(1473, 1500, 28, 65507), 1473)
        self.assertEqual(size(1201, None, 28, 65507), 1201)


class LoadedRefusalTest(ServerTestCase):
    """Review of issue 11: a load stream that cannot open names its own
    service and port, and the idle figures stay in the row."""

    def test_a_refused_discard_is_named_and_idle_kept(self):
        server = self.start_server(["echo", "chargen"])
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        discard = closed.getsockname()[1]
        closed.close()                  # nothing listens there now
        ports = ports_of(server)
        ports["discard"] = discard
        rows = diagsvc.measure("127.0.0.1", ["loaded"], seconds=0.1,
                               timeout=TIMEOUT, ports=ports)
        self.assertEqual([row["transport"] for row in rows], ["tcp", "udp"])
        for row in rows:
            self.assertRegex(row["error"], r"^the upload stream: discard "
                             r"port %d: \S" % discard)
            self.assertGreater(row["idle_count"], 0, row)
            self.assertEqual(row["loaded_count"], 0, row)
            self.assertTrue(diagsvc._measure_row_failures(row), row)


class PathMtuTest(ServerTestCase):

    @staticmethod
    def fake_path(local_mtu, drop_above=None, overhead=28):
        """attempt() for a path: refused locally above the MTU, silently
        lost above drop_above."""
        def attempt(size):
            if size + overhead > local_mtu:
                return "refused", local_mtu - overhead
            if drop_above is not None and size + overhead > drop_above:
                return "lost", None
            return "ok", None
        return attempt

    def test_search_finds_the_boundary_and_how_it_fails(self):
        search = diagsvc._mtu_search
        self.assertEqual(search(self.fake_path(65536), 24, 65507),
                         (65507, None, None, [65507]))
        # The kernel's MTU is tried at once, and is the answer.
        self.assertEqual(search(self.fake_path(1400), 24, 65507),
                         (1372, 1373, "refused", [65507, 1372]))
        passed, failed, failure, tried = search(
            self.fake_path(1500, drop_above=1200), 24, 65507)
        self.assertEqual((passed, failed, failure), (1172, 1173, "lost"))
        self.assertEqual(tried[:2], [65507, 1472])
        self.assertLessEqual(len(tried), 14)
        for mtu in range(60, 1600, 7):      # every boundary, exactly
            self.assertEqual(search(self.fake_path(65536, mtu), 24, 65507)[:2],
                             (mtu - 28, mtu - 27))
        self.assertEqual(search(lambda size: ("lost", None), 24, 65507)[:3],
                         (None, 24, "lost"))

    def test_a_late_reply_does_not_end_the_search_low(self):
        path = self.fake_path(1500, drop_above=1200)
        late = set([1172, 748])         # their first try times out

        def attempt(size):
            if size in late:
                late.discard(size)
                return "lost", None
            return path(size)
        passed, failed, failure, tried = diagsvc._mtu_search(attempt, 24,
                                                             65507)
        self.assertEqual((passed, failed, failure), (1172, 1173, "lost"))
        # The smallest lost size is tried twice before it is believed.
        self.assertEqual(tried.count(1173), 2)

    def test_outcomes_are_named(self):
        verdict = diagsvc._mtu_verdict
        row, text = verdict(65507, None, None, 65536, 28, "untested", True)
        self.assertEqual(row["limit"], "none")
        row, text = verdict(1372, 1373, "refused", 1400, 28, "passes", True,
                            1373)
        self.assertEqual((row["limit"], row["limit_mtu_bytes"],
                          row["path_mtu_bytes"]), ("local-mtu", 1400, 1400))
        self.assertIn("refused by this host (EMSGSIZE): its MTU on this "
                      "route is 1400; allowed to fragment, 1373 bytes come "
                      "back", text)
        # The kernel learned a smaller MTU than the lost size needed: an
        # ICMP "fragmentation needed" / "packet too big" came back.
        row, text = verdict(1252, 1253, "lost", 1280, 28, "lost", True, 1473)
        self.assertEqual((row["limit"], row["limit_mtu_bytes"]),
                         ("icmp-too-big", 1280))
        self.assertIn("next-hop MTU 1280", text)
        row, text = verdict(1172, 1173, "lost", 1500, 28, "lost", True, 1473)
        self.assertEqual(row["limit"], "black-hole")
        self.assertNotIn("limit_mtu_bytes", row)
        self.assertIn("a path MTU black hole; allowed to fragment, 1473 "
                      "bytes are lost too", text)
        row, text = verdict(None, 24, "lost", None, 28, "untested", True)
        self.assertEqual(row["limit"], "nothing-back")
        self.assertNotIn("largest_payload_bytes", row)
        self.assertNotIn(None, row.values())

    def test_loopback_carries_the_largest_datagram(self):
        server = self.start_server(["echo"])
        rows = diagsvc.measure("127.0.0.1", ["mtu"],
                               ports=ports_of(server, "udp"))
        self.assertEqual((rows[0]["value"], rows[0]["limit"],
                          rows[0]["sizes_tried"]), (65507, "none", [65507]))

    def test_an_echo_that_truncates_is_not_a_black_hole(self):
        # xinetd's UDP echo returns at most 2,048 bytes of a datagram.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        done = threading.Event()

        def serve():
            while not done.is_set():
                if select.select([sock], [], [], 0.05)[0]:
                    data, source = sock.recvfrom(70000)
                    sock.sendto(data[:2048], source)
        thread = threading.Thread(target=serve)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(done.set)
        rows = diagsvc.measure("127.0.0.1", ["mtu"], timeout=1,
                               ports={"echo": sock.getsockname()[1]})
        self.assertEqual((rows[0]["value"], rows[0]["limit"],
                          rows[0]["echo_truncates_to_bytes"]),
                         (65507, "none", 2048))
        self.assertIn("the echo server returns at most 2048 bytes",
                      rows[0]["detail"])

    def test_local_mtu_refuses_with_emsgsize(self):
        # IPv4 and IPv6 headers: 28 and 48 bytes with UDP's.
        for (host, _), largest in zip(FAMILIES, (1372, 1352)):
            with self.subTest(host=host):
                rows = namespace_run(self, ["ip link set lo mtu 1400"],
                                     NAMESPACE_MEASURE % {
                                         "tests": ["mtu"], "timeout": 2,
                                         "host": host})
                row = rows[0]
                self.assertEqual((row["largest_payload_bytes"], row["limit"],
                                  row["limit_mtu_bytes"], row["fragmented"],
                                  row["fragmented_size_bytes"]),
                                 (largest, "local-mtu", 1400, "passes",
                                  largest + 1))

    def test_black_hole_is_named_and_fragments_are_lost_too(self):
        # lo's MTU just above the filter's limit: the search meets one lost
        # size (tried twice), and the fragmented probe one more.
        rows = namespace_run(self, [
            "ip link set lo mtu 1201",
            "nft add table inet lab",
            "nft add chain inet lab in '{ type filter hook input priority 0; }'",
            # meta length counts the IP header: 1,172 bytes of UDP payload.
            "nft add rule inet lab in udp dport 20007 meta length gt 1200 drop"],
            # Short, as it is mostly waited out by the sizes the filter
            # drops; not shorter, as a good size whose reply a loaded
            # machine delays past it twice would end the search low.
            NAMESPACE_MEASURE % {"tests": ["mtu"], "timeout": 0.6})
        row = rows[0]
        self.assertEqual((row["largest_payload_bytes"], row["limit"],
                          row["fragmented"], row["fragmented_size_bytes"]),
                         (1172, "black-hole", "lost", 1174))
        self.assertEqual(row["sizes_tried"][:3], [65507, 1173, 598])
        self.assertNotIn("limit_mtu_bytes", row)


class SlowTcpEcho(object):
    """Echo on one port number: UDP at once, TCP each message `delay`
    seconds late (a path whose TCP round trip outlasts a short phase)."""

    def __init__(self, delay):
        self.delay = delay
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self):
        sockets = [self.listener, self.udp]
        due = []                            # (when, connection, bytes)
        while not self.stop.is_set():
            wait = 0.05 if not due else max(0.0, min(
                0.05, due[0][0] - time.monotonic()))
            for ready in select.select(sockets, [], [], wait)[0]:
                if ready is self.listener:
                    sockets.append(self.listener.accept()[0])
                elif ready is self.udp:
                    data, source = self.udp.recvfrom(70000)
                    self.udp.sendto(data, source)
                else:
                    try:
                        data = ready.recv(65536)
                    except OSError:         # the client reset it
                        data = b""
                    if not data:
                        sockets.remove(ready)
                        ready.close()
                        continue
                    due.append((time.monotonic() + self.delay, ready, data))
            while due and due[0][0] <= time.monotonic():
                _, connection, data = due.pop(0)
                try:
                    connection.sendall(data)
                except OSError:
                    pass
        for sock in sockets[2:]:
            sock.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.listener.close()
        self.udp.close()


class LoadedTest(ServerTestCase):

    def test_a_phase_waits_for_a_round_trip_of_each_transport(self):
        echo = SlowTcpEcho(delay=0.1)
        self.addCleanup(echo.close)
        server = self.start_server(["chargen", "discard"], max_per_source=0)
        ports = ports_of(server)
        ports["echo"] = echo.port
        # Phases of 0.05 s: the first TCP round trip takes 0.1 s, twice a
        # phase (small on purpose: the ratio is what is tested).
        rows = diagsvc.measure("127.0.0.1", ["loaded"], seconds=0.1,
                               ports=ports)
        tcp = rows[0]
        self.assertEqual(tcp["transport"], "tcp")
        self.assertGreaterEqual(tcp["idle_count"], 1, tcp)
        self.assertGreaterEqual(tcp["loaded_count"], 1, tcp)
        self.assertGreaterEqual(tcp["idle_min_us"], 100000)

    def test_idle_and_loaded_side_by_side(self):
        # The server in a process of its own: in this one it would share
        # the interpreter lock with the load it serves, and a busy machine
        # could leave the loaded pings no turn.
        server = ServerProcess("echo", "chargen", "discard", "--bind",
                               "127.0.0.1", "--max-per-source", "0",
                               "--port", "echo=0", "--port", "chargen=0",
                               "--port", "discard=0")
        self.addCleanup(server.kill)
        ports = dict((name, server.addresses[name, "tcp"][0][1])
                     for name in ("chargen", "discard"))
        ports["echo"] = server.addresses["echo", "udp"][0][1]
        self.assertEqual(ports["echo"], server.addresses["echo", "tcp"][0][1])
        # Phases of 0.2 s, short on purpose: a phase goes on until each
        # transport has had a round trip, so no count can be 0 however
        # loaded this machine is.
        rows = diagsvc.measure("127.0.0.1", ["loaded"], seconds=0.4,
                               ports=ports)
        self.assertEqual([row["transport"] for row in rows], ["tcp", "udp"])
        for row in rows:
            self.assertGreater(row["idle_count"], 0, row)
            self.assertGreater(row["loaded_count"], 0, row)
            self.assertEqual(row["increase_p50_us"], round(
                row["loaded_p50_us"] - row["idle_p50_us"], 1))
            self.assertGreater(row["download_mbyte_per_s"], 0)
            self.assertGreater(row["upload_mbyte_per_s"], 0)
            self.assertNotIn(None, row.values())

    def test_a_real_queue_raises_the_loaded_rtt(self):
        # A 20 Mbit/s token bucket on lo (lo's MTU lowered first, or tbf
        # drops the 64 KiB segments and nothing queues).
        rows = namespace_run(self, [
            "ip link set lo mtu 1500",
            "tc qdisc add dev lo root tbf rate 20mbit burst 32kbit "
            "latency 300ms"],
            # The queue is full within the first tenth of the loaded phase,
            # and the loaded pings wait 75-170 ms in it (measured), several
            # times the 20 ms asked; 1.6 s gives the p90 enough pings.
            NAMESPACE_MEASURE % {"tests": ["loaded"], "seconds": 1.6})
        self.assertEqual([row["transport"] for row in rows], ["tcp", "udp"])
        for row in rows:
            self.assertLess(row["idle_p50_us"], 5000, row)
            # TCP's sawtooth empties the queue now and then, so a few
            # loaded pings are fast: p90 shows the queue.
            self.assertGreater(row["increase_p90_us"], 20000, row)


class ReportingTest(ServerTestCase):

    def port_options(self, server):
        return ["--port=%s=%d" % item for item in sorted(ports_of(server).items())]

    def run_commands(self, *commands):
        """run_command() for each list of arguments, all at once, so that
        their windows and start-ups are waited out together: the
        CompletedProcess of each, in order."""
        processes = []
        for args in commands:
            process = subprocess.Popen(
                [sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, universal_newlines=True)
            self.addCleanup(process.wait)
            self.addCleanup(process.kill)
            processes.append(process)
        results = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=60)
            results.append(subprocess.CompletedProcess(
                process.args, process.returncode, stdout, stderr))
        return results

    def test_interval_rows_stream_as_json_lines(self):
        server = self.start_server(["echo", "chargen"])
        # Short on purpose: 0.1 s gives each test two interval rows (or one
        # and a sliver), all this checks.
        result = run_command("measure", "127.0.0.1", "latency", "udp",
                             "download", "--seconds", "0.1", "--interval",
                             "0.05", "--json", *self.port_options(server))
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        rows = [json.loads(line) for line in lines]     # every line is JSON
        kinds = [(row["type"], row["test"], row["transport"]) for row in rows]
        summaries = [kind for kind in kinds if kind[0] == "summary"]
        self.assertEqual(summaries, [
            ("summary", "latency", "tcp"), ("summary", "latency", "udp"),
            ("summary", "download", "tcp"), ("summary", "udp", "udp")])
        # Each test's interval rows come before its summary, in time order.
        for test, transport in (("latency", "tcp"), ("latency", "udp"),
                                ("udp", "udp"), ("download", "tcp")):
            spans = [(row["start_s"], row["end_s"]) for row in rows
                     if row["type"] == "interval" and row["test"] == test
                     and row["transport"] == transport]
            self.assertGreaterEqual(len(spans), 1, (test, transport))
            self.assertEqual(spans[0][0], 0.0)
            for (start, end), (next_start, _) in zip(spans, spans[1:]):
                self.assertLess(start, end)
                self.assertEqual(end, next_start)
            last_interval = max(i for i, kind in enumerate(kinds)
                                if kind == ("interval", test, transport))
            self.assertLess(last_interval, kinds.index(
                ("summary", test, transport)))
        common = {"type", "test", "transport", "host", "address", "port"}
        for row in rows:
            self.assertLessEqual(common, set(row), row)
            self.assertEqual(row["host"], "127.0.0.1")
            self.assertNotIn(None, row.values())
            if row["type"] == "interval":
                self.assertLessEqual({"start_s", "end_s"}, set(row))
                if row["test"] == "download":
                    self.assertLessEqual({"bytes", "mbyte_per_s"}, set(row))
                elif row["test"] == "udp":
                    self.assertLessEqual({"sent", "received"}, set(row))
                else:
                    self.assertIn("count", row)

    def test_interval_rows_for_people_then_the_table(self):
        server = self.start_server(["echo"])
        # 25 datagrams in a quarter of a second, two interval rows or more.
        result = run_command("measure", "127.0.0.1", "udp", "--seconds",
                             "0.25", "--interval", "0.1", "--rate", "100",
                             *self.port_options(server))
        self.assertEqual(result.returncode, 0, result.stderr)
        # Each row's span and counts depend on this machine's load; their
        # shape does not.
        self.assertRegex(result.stdout, r"^udp udp  0\.00-\d+\.\d\d s  sent "
                                        r"\d+  received \d+  RTT p50 ")
        self.assertRegex(result.stdout, r"\nTEST +PROTO +RESULT +DETAIL\n"
                                        r"udp +udp +0\.0 % loss +sent 25 ")

    def test_thresholds_set_the_exit_status_and_say_which(self):
        echo = MischievousEcho()            # loses 10 %
        self.addCleanup(echo.close)
        server = self.start_server(["echo", "chargen"])
        # The three commands at once: each has a socket of its own, and the
        # echo drops by sequence number whoever sent it.  20 datagrams in
        # 0.1 s, 2 of them lost.  Above 5 % a reply that comes too late
        # only adds to the loss, so a short timeout will do; under 20 %
        # every other reply must come back in time.
        above, under, result = self.run_commands(*[
            ["measure", "127.0.0.1", "udp", "--seconds", "0.1", "--rate",
             "200", "--timeout", timeout, "--max-loss", limit, "--port",
             "echo=%d" % echo.port]
            for limit, timeout in (("5", "0.2"), ("20", "0.5"))] + [
            ["measure", "127.0.0.1", "latency", "download", "--seconds",
             "0.05", "--max-rtt", "0", "--rtt-percentile", "50",
             "--min-rate", "1e9"] + self.port_options(server)])
        self.assertEqual(above.returncode, 1, above.stderr)
        self.assertEqual(under.returncode, 0, under.stderr)
        self.assertEqual(under.stderr, "")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 3, result.stderr)
        self.assertRegex(result.stderr, r"latency/tcp: p50_us [0-9.]+ ms is "
                                        r"above --max-rtt 0\n")
        self.assertRegex(result.stderr, r"latency/udp: p50_us [0-9.]+ ms is "
                                        r"above --max-rtt 0\n")
        self.assertRegex(result.stderr, r"download/tcp: [0-9.]+ MB/s is below "
                                        r"--min-rate 1e\+09\n")

    @unittest.skipUnless(ON_LINUX, "Linux refuses the connect itself")
    def test_a_socket_error_stops_udp_and_mtu_alone(self):
        # connect() to the broadcast address: EACCES, before any datagram.
        rows = diagsvc.measure("255.255.255.255", ["udp", "mtu"],
                               seconds=0.2, timeout=0.3)
        self.assertEqual([(row["test"], row["transport"], row["value"],
                           row["host"]) for row in rows],
                         [("udp", "udp", None, "255.255.255.255"),
                          ("mtu", "udp", None, "255.255.255.255")])
        for row in rows:
            self.assertTrue(row["error"])
        self.assertEqual(len(diagsvc._measure_failures(rows)), 2)

    def test_udp_usage_errors_exit_2(self):
        for args, message in (
                (["--size", "23"], "the udp test needs 24 to 65507"),
                (["--rate", "10", "--bitrate", "1M", "--size", "100"],
                 "at most two of --rate, --bitrate and --size"),
                (["--bitrate", "10X"], "is not a bitrate such as 10M"),
                (["--rate", "0"], "is not a number > 0"),
                (["--interval=-1"], "is not a number > 0")):
            with self.subTest(args=args):
                result = run_command("measure", "127.0.0.1", "udp", *args)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn(message, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_several_hosts_in_one_command(self):
        server = self.start_server(["echo"])
        port = "--port=echo=%d" % server.addresses["echo", "tcp"][0][1]
        # Nothing listens on 127.0.0.2: its row is refused, the exit is 1.
        result = run_command("probe", "127.0.0.1", "127.0.0.2", "echo",
                             "--tcp", "--json", port)
        self.assertEqual(result.returncode, 1, result.stderr)
        rows = json.loads(result.stdout)
        self.assertEqual([(row["host"], row["service"], row["verdict"])
                          for row in rows],
                         [("127.0.0.1", "echo", "open"),
                          ("127.0.0.2", "echo", "refused")])
        result = run_command("probe", "127.0.0.1", "127.0.0.2", "echo",
                             "--tcp", port)
        self.assertRegex(result.stdout, r"^HOST +SERVICE +PROTO")
        result = run_command("measure", "127.0.0.1", "localhost", "latency",
                             "--seconds", "0.05", "-4", "--json", port)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([(row["host"], row["address"], row["transport"])
                          for row in json.loads(result.stdout)],
                         [("127.0.0.1", "127.0.0.1", "tcp"),
                          ("127.0.0.1", "127.0.0.1", "udp"),
                          ("localhost", "127.0.0.1", "tcp"),
                          ("localhost", "127.0.0.1", "udp")])
        result = run_command("measure", "127.0.0.1", "latnecy")
        self.assertEqual(result.returncode, 2)
        self.assertIn("nor is it a test: latency, download", result.stderr)


# --- Lifecycle ----------------------------------------------------------------


class LifecycleTest(unittest.TestCase):

    def test_shutdown_from_another_thread_is_prompt_and_leaves_nothing(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            server = diagsvc.Server(bind=["127.0.0.1"], port_offset=None)
            # No timer for an hour: only the wake-up socketpair can end the
            # loop's select() now, so the test fails if shutdown() polls.
            server._next_timer = time.monotonic() + 3600
            loop = threading.Thread(target=server.serve_forever)
            loop.daemon = True          # a broken waker must not hang exit
            loop.start()
            client = socket.create_connection(
                server.addresses["chargen", "tcp"][0], timeout=TIMEOUT)
            client.recv(100)
            stopper = threading.Thread(target=server.shutdown)
            stopper.start()
            loop.join(TIMEOUT)
            stopper.join()
            self.assertFalse(loop.is_alive())
            sockets = [h.sock for h in server.listeners + server.endpoints]
            streams = list(server.streams)
            server.close()
            client.close()
            self.assertTrue(sockets and streams)
            for sock in sockets + [s.sock for s in streams]:
                self.assertEqual(sock.fileno(), -1)
            del server, sockets, streams
            gc.collect()
        self.assertEqual([w for w in caught
                          if issubclass(w.category, ResourceWarning)], [])

    def test_context_manager_and_start(self):
        with diagsvc.Server(["echo"], bind=["127.0.0.1"],
                            port_offset=None) as server:
            self.assertIs(server.start(), server)
            self.assertEqual(set(server.addresses),
                             {("echo", "tcp"), ("echo", "udp")})
            with socket.create_connection(server.addresses["echo", "tcp"][0],
                                          timeout=TIMEOUT) as sock:
                sock.sendall(b"x")
                self.assertEqual(sock.recv(1), b"x")
        self.assertFalse(server._running)

    def test_port_zero_gives_one_port_per_service_where_it_can(self):
        with diagsvc.Server(["echo"], bind=["127.0.0.1"],
                            ports={"echo": 0}) as server:
            ports = set(port for key in server.addresses
                        for _, port in server.addresses[key])
            self.assertEqual(len(ports), 1)
            self.assertNotEqual(ports, {0})

    def test_port_zero_starts_over_when_the_other_transport_is_taken(self):
        # Another program holds, for UDP, the number TCP's port 0 gave (a
        # client's ephemeral port, on a busy machine): the service moves.
        holders = []
        self.addCleanup(lambda: [holder.close() for holder in holders])

        class Unlucky(diagsvc.Server):
            def _bind(self, name, transport, family, host, port, *scope):
                if transport == "udp" and not holders:
                    holder = socket.socket(family, socket.SOCK_DGRAM)
                    holder.bind((host, port))
                    holders.append(holder)
                return diagsvc.Server._bind(self, name, transport, family,
                                            host, port, *scope)
        with Unlucky(["echo"], bind=["127.0.0.1"], port_offset=None) as server:
            (tcp,) = server.addresses["echo", "tcp"]
            (udp,) = server.addresses["echo", "udp"]
            self.assertEqual(tcp, udp)
            self.assertNotEqual(udp, holders[0].getsockname())

    def test_a_taken_port_raises_server_error_and_closes_what_was_bound(self):
        with diagsvc.Server(["echo"], bind=["127.0.0.1"], transports=["tcp"],
                            port_offset=None) as first:
            port = first.addresses["echo", "tcp"][0][1]
            with self.assertRaisesRegex(diagsvc.ServerError,
                                        "echo/tcp on 127.0.0.1 port %d: the "
                                        "port is in use" % port):
                diagsvc.Server(["discard", "echo"], bind=["127.0.0.1"],
                               transports=["tcp"], ports={"echo": port},
                               port_offset=None)

    def test_bind_error_messages(self):
        denied = OSError(errno.EACCES, "Permission denied")
        self.assertEqual(
            diagsvc._bind_error("echo", "tcp", "0.0.0.0", 7, denied),
            "cannot bind echo/tcp on 0.0.0.0 port 7: permission denied "
            "(ports below 1024 need root); run as root or add "
            "--port-offset 10000")


# --- The command line ---------------------------------------------------------


def run_command(*args, **options):
    return subprocess.run(
        [sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60, **options)


def run_commands_at_once(*argument_lists):
    """run_command() for each list of ARGUMENT_LISTS, all at once (each
    waits on its own child); return their results, in order."""
    results = [None] * len(argument_lists)

    def run(index, arguments):
        try:
            results[index] = run_command(*arguments)
        except Exception as error:          # raised again in the caller
            results[index] = error
    threads = [threading.Thread(target=run, args=(index, arguments))
               for index, arguments in enumerate(argument_lists)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()           # run_command's own timeout bounds each
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


class ServerProcess(object):
    """diagsvc.py in a subprocess; start lines parsed into addresses."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True)
        self.addresses = {}
        self.lines = []
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError("server exited: " +
                                     self.process.stderr.read())
            self.lines.append(line.rstrip("\n"))
            match = START_LINE.match(line.rstrip("\n"))
            if match:
                service, transport, host, port = match.groups()
                self.addresses.setdefault((service, transport), []).append(
                    (host, int(port)))
            elif line.startswith("diagsvc: running as"):
                break

    def stop(self, signum=None):
        import signal
        self.process.send_signal(signum or signal.SIGTERM)
        try:
            return self.process.wait(TIMEOUT)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
            self.process.stderr.close()


class CommandLineTest(unittest.TestCase):

    def start(self, *args):
        server = ServerProcess(*args)
        self.addCleanup(server.kill)
        return server

    @unittest.skipIf(sys.platform == "win32", "signals")
    def test_serves_and_stops_on_sigterm_and_sigint(self):
        import signal
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                server = self.start("--bind", "127.0.0.1", "--port", "echo=0",
                                    "--port", "time=0", "echo", "time", "-q")
                self.assertEqual(sorted(server.addresses), [
                    ("echo", "tcp"), ("echo", "udp"), ("time", "tcp"),
                    ("time", "udp")])
                (host, port), = server.addresses["echo", "tcp"]
                with socket.create_connection((host, port), TIMEOUT) as sock:
                    sock.sendall(b"hello")
                    self.assertEqual(recv_exactly(sock, 5), b"hello")
                # A broken signal path never exits: stop() waits TIMEOUT.
                self.assertEqual(server.stop(signum), 0)

    def test_transport_choice_and_all_services(self):
        server = self.start("--bind", "127.0.0.1", "--port-offset", "0",
                            "--tcp", *["--port=%s=0" % name
                                       for name in diagsvc.SERVICE_NAMES])
        self.assertEqual(sorted(server.addresses), sorted(
            (name, "tcp") for name in diagsvc.SERVICE_NAMES))
        server.stop()

    def test_taken_port_exits_2_with_one_line(self):
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run_command("echo", "--tcp", "--bind", "127.0.0.1",
                             "--port", "echo=%d" % port)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, (
            "diagsvc: error: cannot bind echo/tcp on 127.0.0.1 port %d: the "
            "port is in use by another program; stop it, or choose another "
            "port with --port echo=PORT or --port-offset N\n" % port))

    def test_usage_errors_exit_2(self):
        for args, text in ((["nosuch"], "unknown service 'nosuch'"),
                           (["--port", "echo=x"], "give SERVICE=PORT"),
                           (["--port-offset", "-5"], "not a number >= 0"),
                           (["--port-offset", "65530", "--bind", "127.0.0.1"],
                            "outside 0-65535"),
                           (["--tcp", "--udp"], "not allowed with"),
                           (["--port-offset", "-1"], "not a number >= 0"),
                           (["--idle-timeout", "soon"], "not a number >= 0"),
                           (["--port", "echo=65536"], "give SERVICE=PORT"),
                           (["--allow", "10.0.0.300"], "not an IP address"),
                           (["--qotd-file", "/nonexistent/quotes"],
                            "cannot read quote file /nonexistent/quotes")):
            with self.subTest(args=args):
                result = run_command(*args)
                self.assertEqual(result.returncode, 2)
                self.assertIn(text, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertEqual(result.stdout, "")

    def test_bad_quote_file_names_the_line(self):
        with tempfile.NamedTemporaryFile("wb", suffix=".txt",
                                         delete=False) as quote_file:
            quote_file.write(b"good\n%\nbad \x1b[31m\n")
        self.addCleanup(os.unlink, quote_file.name)
        result = run_command("--qotd-file", quote_file.name)
        self.assertEqual(result.returncode, 2)
        self.assertIn("line 3 holds '\\x1b'", result.stderr)

    def test_quote_file_is_served(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt",
                                         delete=False) as quote_file:
            quote_file.write("The only quote.\n")
        self.addCleanup(os.unlink, quote_file.name)
        server = self.start("qotd", "--tcp", "--bind", "127.0.0.1",
                            "--port", "qotd=0", "--qotd-file", quote_file.name)
        with socket.create_connection(server.addresses["qotd", "tcp"][0],
                                      TIMEOUT) as sock:
            self.assertEqual(recv_to_eof(sock), b"The only quote.\r\n")
        server.stop()

    def test_main_in_process(self):
        stderr = io.StringIO()
        stdout = io.StringIO()
        real = sys.stderr, sys.stdout
        sys.stderr, sys.stdout = stderr, stdout
        try:
            self.assertEqual(diagsvc.main(["--version"]), 0)
            self.assertEqual(diagsvc.main(["--bogus-flag"]), 2)
        finally:
            sys.stderr, sys.stdout = real
        self.assertIn("diagsvc " + diagsvc.__version__, stdout.getvalue())
        self.assertIn("unrecognized arguments: --bogus-flag", stderr.getvalue())

    def test_runs_as_a_module(self):
        result = subprocess.run(
            [sys.executable, "-m", "diagsvc", "--version"], cwd=HERE,
            stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(result.stdout.strip(), "diagsvc " + diagsvc.__version__)



# --- Trust: loops, the log, IPv6 prefixes, interfaces and scopes ------------


def in_namespace(test, setup, body):
    """Run body (Python, with diagsvc imported, printing one JSON value) in
    a fresh network namespace after the shell commands in setup; return
    the value.  Skips where that cannot be done (not root, no unshare/ip).
    """
    import shutil
    if not ON_LINUX or os.geteuid() != 0:
        test.skipTest("needs root on Linux for a network namespace")
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            test.skipTest("needs the %s command" % tool)
    script = "\n".join([
        "import json, os, socket, subprocess, sys, time",
        "sys.path.insert(0, %r)" % HERE,
        "import diagsvc",
        "subprocess.check_call(%r, shell=True)" % (
            "ip link set lo up; " + setup),
        # The kernel may take a moment to route a new address: wait (with
        # a deadline) until every address the setup added can be reached.
        "for address in %r:" % (
            ["127.0.0.1", "::1"] + [
                address for address in re.findall(
                    r"addr add ([0-9a-fA-F:.]+)/", setup)
                if not address.lower().startswith("fe80")]),  # need a scope
        "    deadline = time.monotonic() + 10",
        "    while True:",
        "        probe = socket.socket(socket.AF_INET6 if ':' in address",
        "                              else socket.AF_INET, socket.SOCK_DGRAM)",
        "        try:",
        "            probe.connect((address, 9))",
        "            break",
        "        except OSError:",
        "            if time.monotonic() > deadline:",
        "                raise",
        "            time.sleep(0.01)",
        "        finally:",
        "            probe.close()",
        body])
    try:
        result = subprocess.run(
            ["unshare", "-n", sys.executable, "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60)
    except subprocess.TimeoutExpired:
        test.fail("the namespace test did not finish within 60 s")
    if result.returncode != 0 and "unshare failed" in result.stderr:
        test.skipTest("cannot make a network namespace: " +
                      result.stderr.strip())
    test.assertEqual(result.returncode, 0, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


class InterfaceTest(unittest.TestCase):
    """Item 7: an IPv6 UDP reply is routed, not pinned to an interface."""

    def test_ipv6_reply_to_loopback_from_an_address_of_another_link(self):
        # fd00::2 lives on br0; a datagram from ::1 to it arrives on br0's
        # index.  The reply (from fd00::2 to ::1) must go by the route (lo).
        reply = in_namespace(self, (
            "ip link add br0 type bridge; ip link set br0 up; "
            "ip -6 addr add fd00::2/64 dev br0 nodad"), """
with diagsvc.Server(["echo"], bind=["::"], port_offset=None,
                    transports=("udp",)) as server:
    server.start()
    port = server.addresses["echo", "udp"][0][1]
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.bind(("::1", 0))
    client.settimeout(3.0)
    answer = None
    for _ in range(3):                  # UDP may lose one; a busy host
        client.sendto(b"via lo", ("fd00::2", port))
        try:
            data, source = client.recvfrom(100)
        except socket.timeout:
            continue
        answer = [data.decode(), source[0], source[1] == port]
        break
    print(json.dumps(answer or server.stats()["echo", "udp"]))
""")
        self.assertEqual(reply, ["via lo", "fd00::2", True])


def settled(read, quiet=0.5):
    """A predicate for wait_until: read() gave the same value for quiet
    seconds (a counter another thread was moving has stopped)."""
    last = [read(), time.monotonic()]

    def check():
        value = read()
        if value != last[0]:
            last[:] = [value, time.monotonic()]
            return False
        return time.monotonic() - last[1] >= quiet
    return check


class LoopWatchTest(ServerTestCase):
    """Item 1: no spoofed datagram starts a loop that lasts, whatever the
    ports, and a real client is not cut off."""

    def echo_pair(self):
        first = self.start_server(["echo"], transports=("udp",))
        second = self.start_server(["echo"], transports=("udp",))
        return first, second

    def datagrams(self, *servers):
        return tuple(server.counters["echo", "udp"].datagrams
                     for server in servers)

    def loop_refusals(self, *servers):
        return sum(server.counters["echo", "udp"].refusals.get(
            "loop-detected", 0) for server in servers)

    def inject(self, sender, receiver, payloads):
        # A datagram to receiver with sender's address as its source: sent
        # from sender's own socket, as a spoofer's would arrive.
        target = receiver.addresses["echo", "udp"][0]
        for payload in payloads:
            sender.endpoints[0].sock.sendto(payload, target)

    def assert_loop_stops(self, first, second):
        wait_until(settled(lambda: self.datagrams(first, second)),
                   message="the echo-echo loop to stop")
        self.assertGreaterEqual(self.loop_refusals(first, second), 1)
        self.assertLess(sum(self.datagrams(first, second)), 10000)
        # Both still serve a real client.
        for server in (first, second):
            self.assertEqual(self.udp_exchange(server, "echo", b"after"),
                             b"after")

    def test_spoofed_datagram_between_two_echo_servers_stops(self):
        first, second = self.echo_pair()
        self.inject(second, first, [b"spoofed"])
        self.assert_loop_stops(first, second)

    def test_many_interleaved_loops_stop(self):
        first, second = self.echo_pair()
        self.inject(second, first, [b"loop %d" % n for n in range(40)])
        self.assert_loop_stops(first, second)

    def test_loop_through_our_daytime_and_a_foreign_echo_stops(self):
        # A foreign echo (here: ours with the guard off) returns daytime's
        # line unchanged; the daytime side must see its reply come back.
        foreign = self.start_server(["echo"], transports=("udp",),
                                    udp_guard=False)
        ours = self.start_server(["daytime"], transports=("udp",),
                                 udp_rate=0)
        foreign.endpoints[0].sock.sendto(
            b"", ours.addresses["daytime", "udp"][0])
        counts = lambda: (foreign.counters["echo", "udp"].datagrams,
                          ours.counters["daytime", "udp"].datagrams)
        wait_until(settled(counts), message="the daytime-echo loop to stop")
        self.assertEqual(ours.counters["daytime", "udp"].refusals,
                         {"loop-detected": 1})

    def test_echo_rate_ends_a_loop_with_a_foreign_chargen(self):
        # A chargen answers each datagram with new bytes: no content tells
        # it from a client.  --udp-echo-rate bounds it: the first datagram
        # over the rate is dropped, and with it the loop.
        foreign = self.start_server(["chargen"], transports=("udp",),
                                    udp_guard=False, udp_rate=0)
        echo = self.start_server(["echo"], transports=("udp",),
                                 udp_echo_rate=200)
        foreign.endpoints[0].sock.sendto(
            b"start", echo.addresses["echo", "udp"][0])
        wait_until(settled(lambda: echo.counters["echo", "udp"].datagrams),
                   message="the chargen-echo loop to stop")
        self.assertEqual(echo.counters["echo", "udp"].refusals,
                         {"rate-limit": 1})
        # A client still gets a second's worth at once, then the rate.
        self.assertEqual(self.udp_exchange(echo, "echo", b"client"),
                         b"client")

    def test_empty_requests_after_an_empty_chargen_reply_are_answered(self):
        # RFC 864 allows 0 characters.  A chargen client sends the same
        # empty datagram each time: after an empty reply, that request is
        # not our reply coming back.
        real = diagsvc._random_below
        diagsvc._random_below = lambda limit: 0     # every reply empty
        self.addCleanup(setattr, diagsvc, "_random_below", real)
        server = self.start_server(["chargen"], transports=("udp",))
        sock = self.udp_socket()
        for _ in range(20):
            sock.sendto(b"", server.addresses["chargen", "udp"][0])
            self.assertEqual(sock.recv(100), b"")
        self.assertEqual(server.counters["chargen", "udp"].refusals, {})

    def test_a_client_sending_distinct_datagrams_gets_every_reply(self):
        server = self.start_server(["echo"], transports=("udp",))
        sock = self.udp_socket()
        sock.connect(server.addresses["echo", "udp"][0])
        total, window, sent, received = 20000, 16, 0, []
        while len(received) < total:
            while sent < total and sent - len(received) < window:
                sock.send(b"%031d\n" % sent)
                sent += 1
            received.append(sock.recv(64))
        self.assertEqual(sorted(received),
                         [b"%031d\n" % n for n in range(total)])
        self.assertEqual(server.counters["echo", "udp"].refusals, {})

    def test_a_client_retrying_one_payload_gets_every_reply(self):
        server = self.start_server(["echo"], transports=("udp",))
        sock = self.udp_socket()
        target = server.addresses["echo", "udp"][0]
        for _ in range(2):              # a probe's three tries, twice
            for _ in range(3):
                sock.sendto(b"diagsvc probe 1234\r\n", target)
                self.assertEqual(sock.recv(100), b"diagsvc probe 1234\r\n")
            sock.sendto(b"typed twice", target)
            self.assertEqual(sock.recv(100), b"typed twice")
        self.assertEqual(server.counters["echo", "udp"].refusals, {})

    @needs_linux
    def test_source_ports_below_1024_are_refused(self):
        if os.geteuid() != 0:
            self.skipTest("binding a port below 1024 needs root")
        server = self.start_server(["echo"], transports=("udp",))
        # An address of this process's own (two suites may run at once),
        # and ports that a host service may hold skipped.
        pid = os.getpid()
        host = "127.%d.%d.%d" % (100 + pid % 100, pid // 100 % 250 + 1,
                                 pid // 25000 % 250 + 1)
        refused = 0
        for port in (1023, 1, 555, 777, 999):
            try:
                low = sock_from(host, port, socket.SOCK_DGRAM)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                continue
            self.addCleanup(low.close)
            low.sendto(b"service?", server.addresses["echo", "udp"][0])
            self.assert_no_reply(low, server, "127.0.0.1")
            refused += 1
        self.assertGreaterEqual(refused, 3)
        self.assertEqual(server.counters["echo", "udp"].refusals,
                         {"loop-guard": refused})


class LoopWatchRepeatsTest(ServerTestCase):
    """The outside review of the loop watch: a spoofer cannot cut a client
    off, a test may repeat a payload, every byte of a payload counts, and
    the count decays under any load."""

    def echo_socket(self, server):
        sock = self.udp_socket()
        sock.connect(server.addresses["echo", "udp"][0])
        return sock

    def hold_loop_clock(self):
        # No decay and no forgetting while a test counts returns exactly
        # (a loaded machine may take seconds over it); both are read from
        # the module at each sweep.
        for name in ("LOOP_MEMORY", "LOOP_RETURN_INTERVAL"):
            self.addCleanup(setattr, diagsvc, name, getattr(diagsvc, name, 1.0))
            setattr(diagsvc, name, 1e6)

    def refusals(self, server, service="echo"):
        return server.counters[service, "udp"].refusals

    def test_a_spoofer_cannot_cut_off_a_client_with_distinct_payloads(self):
        # Datagrams "from" the client with one payload, as a spoofer sends
        # them (the server cannot tell them from the client's own): past
        # the allowance they go unanswered, the client's own do not.
        self.hold_loop_clock()
        server = self.start_server(["echo"], transports=("udp",))
        client = self.echo_socket(server)
        for _ in range(30):
            client.send(b"X")
        wait_until(lambda: server.counters["echo", "udp"].datagrams == 30,
                   message="30 datagrams handled")
        self.assertEqual(self.refusals(server), {"loop-detected": 13})
        for _ in range(17):             # the first and 16 returns
            self.assertEqual(client.recv(100), b"X")
        for number in range(200):
            client.send(b"seq %010d" % number)
            self.assertEqual(client.recv(100), b"seq %010d" % number)
        client.send(b"X")               # still a return past the allowance
        self.assert_no_reply(client, server, "127.0.0.1")
        self.assertEqual(self.refusals(server), {"loop-detected": 14})

    def test_the_same_payload_again_and_again_from_one_socket(self):
        # The README's example in a test: one socket, b"hello" each time.
        self.hold_loop_clock()
        # The decay below comes at a sweep: ten a second, not one.
        self.addCleanup(setattr, diagsvc, "MAX_TIMER_WAIT",
                        diagsvc.MAX_TIMER_WAIT)
        diagsvc.MAX_TIMER_WAIT = 0.1
        server = self.start_server(["echo", "chargen"], transports=("udp",))
        sock = self.udp_socket()
        target = server.addresses["echo", "udp"][0]
        for _ in range(17):             # the first, then 16 repeats
            sock.sendto(b"hello", target)
            self.assertEqual(sock.recv(100), b"hello")
        sock.sendto(b"hello", target)
        self.assert_no_reply(sock, server, "127.0.0.1")
        self.assertEqual(self.refusals(server), {"loop-detected": 1})
        sock.settimeout(TIMEOUT)
        # Then one each 0.25 s (the README's second, sooner): once the
        # count has gone down, it is answered.
        diagsvc.LOOP_MEMORY = diagsvc.LOOP_RETURN_INTERVAL = 0.25
        peer = ("127.0.0.1", sock.getsockname()[1])
        wait_until(lambda: server.loop_suspects.get(peer, 0) < 16,
                   message="the count of returns to go down")
        sock.sendto(b"hello", target)
        self.assertEqual(sock.recv(100), b"hello")
        # udp_guard=False: every repeat is answered.
        unguarded = self.start_server(["echo"], transports=("udp",),
                                      udp_guard=False)
        target = unguarded.addresses["echo", "udp"][0]
        for _ in range(100):
            sock.sendto(b"hello", target)
            self.assertEqual(sock.recv(100), b"hello")
        self.assertEqual(self.refusals(unguarded), {})

    def test_the_count_decays_while_the_server_is_busy(self):
        # A generation of remembered replies also ends when it is full;
        # a small table makes a modest flood fill it many times a second.
        # Sweeps ten times a second, and, once the count of 2 is checked,
        # a decay every 0.25 s: it goes in about 0.5 s, not 2 (restored
        # after).
        for name, value in (("LOOP_TABLE_MAX", 32), ("MAX_TIMER_WAIT", 0.1)):
            self.addCleanup(setattr, diagsvc, name, getattr(diagsvc, name))
            setattr(diagsvc, name, value)
        self.addCleanup(setattr, diagsvc, "LOOP_RETURN_INTERVAL",
                        diagsvc.LOOP_RETURN_INTERVAL)
        server = self.start_server(["echo"], transports=("udp",))
        pinger = self.echo_socket(server)
        for _ in range(3):
            pinger.send(b"ping")
            self.assertEqual(pinger.recv(100), b"ping")
        peer = pinger.getsockname()
        self.assertEqual(server.loop_suspects.get(peer), 2)
        diagsvc.LOOP_RETURN_INTERVAL = 0.25
        flood = self.echo_socket(server)
        flood.setblocking(False)
        sent = [0]

        def flood_then_check():
            for _ in range(40):
                sent[0] += 1
                try:
                    flood.send(b"%d" % sent[0])
                except BlockingIOError:
                    pass
            try:
                while True:
                    flood.recv(100)
            except BlockingIOError:
                pass
            return peer not in server.loop_suspects
        wait_until(flood_then_check, message="the count to decay")

    def test_a_full_generation_of_replies_starts_a_new_one(self):
        self.addCleanup(setattr, diagsvc, "LOOP_TABLE_MAX",
                        diagsvc.LOOP_TABLE_MAX)
        diagsvc.LOOP_TABLE_MAX = 4
        server = self.start_server(["echo"], transports=("udp",))
        sock = self.echo_socket(server)
        for number in range(20):
            sock.send(b"%d" % number)
            self.assertEqual(sock.recv(100), b"%d" % number)
        # However the clock ages them, no generation holds more than 4.
        self.assertLess(len(server.replied), 4)
        self.assertLessEqual(len(server.replied_before), 4)

    def test_large_payloads_that_differ_only_in_the_middle_are_distinct(self):
        server = self.start_server(["echo"], transports=("udp",))
        sock = self.echo_socket(server)
        for size, middle in ((2000, 1000), (9000, 4500), (65507, 30000)):
            for number in range(40):
                payload = (b"A" * middle + b"%08d" % number +
                           b"B" * (size - middle - 8))
                sock.send(payload)
                self.assertEqual(sock.recv(70000), payload)
        self.assertEqual(server.counters["echo", "udp"].refusals, {})


class NumericOptionTest(unittest.TestCase):
    """Non-finite or absurd numbers are refused at start, never in the loop."""

    HUGE = 10 ** 400

    def test_the_constructor_refuses_them(self):
        nan, inf = float("nan"), float("inf")
        for options in ({"udp_burst": self.HUGE}, {"udp_rate": nan},
                        {"udp_rate": inf}, {"udp_echo_rate": nan},
                        {"idle_timeout": nan}, {"idle_timeout": inf},
                        {"max_output": self.HUGE},
                        {"max_connections": self.HUGE},
                        {"max_per_source": 2.5}, {"ipv6_prefix": self.HUGE},
                        {"ipv6_prefix": 64.5}, {"ports": {"echo": self.HUGE}}):
            with self.subTest(options=options):
                with self.assertRaises(diagsvc.ServerError) as caught:
                    diagsvc.Server(["echo", "daytime"], bind=["127.0.0.1"],
                                   port_offset=None, **options)
                message = str(caught.exception)
                self.assertNotIn("\n", message)
                self.assertLess(len(message), 120)

    def test_the_command_line_refuses_them_with_one_line(self):
        huge = str(self.HUGE)
        for args in (["--udp-burst", huge], ["--udp-rate", "nan"],
                     ["--udp-rate", "inf"], ["--udp-echo-rate", "nan"],
                     ["--idle-timeout", "nan"], ["--idle-timeout", "inf"],
                     ["--max-output", huge], ["--max-connections", huge],
                     ["--ipv6-prefix", huge], ["--port-offset", huge]):
            with self.subTest(args=args[0]):
                try:
                    result = subprocess.run(
                        [sys.executable, SCRIPT, "daytime", "--udp", "--bind",
                         "127.0.0.1"] + (["--port", "daytime=0"] if
                                         args[0] != "--port-offset" else [])
                        + args,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        universal_newlines=True, timeout=TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.fail("%s %s: the server started" % tuple(args))
                self.assertEqual(result.returncode, 2)
                self.assertEqual(result.stdout, "")
                last = result.stderr.splitlines()[-1]
                self.assertTrue(last.startswith("diagsvc: error: "), last)
                self.assertLess(len(last), 120)
                self.assertNotIn("Traceback", result.stderr)


class ScopeRuleTest(unittest.TestCase):
    """A scope only where the kernel gives one, and only a real index."""

    def assert_refused(self, entry, text):
        with self.assertRaises(diagsvc.ServerError) as caught:
            diagsvc.AccessList(allow=[entry])
        self.assertIn(text, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_a_scope_on_an_address_that_is_not_link_local(self):
        for entry in ("::1%1", "::1%lo", "2001:db8::/32%1", "::/0%1",
                      "fe00::/9%1"):
            with self.subTest(entry=entry):
                self.assert_refused(entry, "only a link-local address")
        diagsvc.AccessList(allow=["fe80::/10%1", "fe80::1%1"])
        result = run_command("echo", "--port", "echo=0", "--bind",
                             "127.0.0.1", "--allow", "::1%1")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, "diagsvc: error: '::1%1': only a "
                         "link-local address (fe80::/10) takes a scope; "
                         "drop the %1\n")

    @unittest.skipUnless(hasattr(socket, "if_indextoname"),
                         "the platform cannot check an interface index")
    def test_an_index_no_interface_has(self):
        for entry in ("fe80::/64%4294967296", "fe80::1%99999"):
            with self.subTest(entry=entry):
                self.assert_refused(entry, "no network interface has index")


class LogLines(object):
    """A log_file that keeps its lines (written from the writer thread)."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.extend(text.splitlines())

    def flush(self):
        pass


class StuckLog(object):
    """A log_file whose write() blocks until released: a full pipe."""

    def __init__(self):
        self.released = threading.Event()
        self.entered = threading.Event()

    def write(self, text):
        self.entered.set()
        self.released.wait(TIMEOUT * 3)

    def flush(self):
        pass


class LogBoundTest(ServerTestCase):
    """Item 2: a bound on log lines in total; no write stalls the loop."""

    @needs_linux
    def test_spoofed_sources_cannot_flood_the_log(self):
        log = LogLines()
        server = self.start_server(["echo"], transports=("udp",),
                                   allow=["127.0.0.1"], verbosity=1,
                                   log_file=log)
        target = server.addresses["echo", "udp"][0]
        denied = lambda: server.counters["echo", "udp"].refusals.get(
            "denied", 0)
        for number in range(2, 202):    # 200 sources, one datagram each
            sock = sock_from("127.0.0.%d" % number, 0, socket.SOCK_DGRAM)
            while sock.getsockname()[1] == target[1]:
                # Another address may hand out the server's own port number,
                # which the loop guard refuses: take another.
                sock.close()
                sock = sock_from("127.0.0.%d" % number, 0, socket.SOCK_DGRAM)
            sock.sendto(b"x", target)
            sock.close()
            if number % 20 == 1:
                # A loaded server may fall behind, and the socket's receive
                # buffer holds only some 160 small datagrams on loopback:
                # let it catch up so that the kernel drops none.
                wait_until(lambda: denied() == number - 1,
                           message="%d refusals" % (number - 1))
        wait_until(lambda: denied() == 200, message="200 refusals")
        self.assertEqual(server.counters["echo", "udp"].refusals,
                         {"denied": 200})
        refusal_lines = lambda: [line for line in log.lines
                                 if "refused" in line]
        suppressed = lambda: getattr(server, "log_lines_suppressed", 0)
        wait_until(lambda: suppressed() + len(refusal_lines()) >= 200,
                   message="every refusal written or counted")
        self.assertLessEqual(len(refusal_lines()), 40)  # the burst, 20
        self.assertEqual(suppressed() + len(refusal_lines()), 200)

    def test_a_log_that_blocks_does_not_stop_the_loop(self):
        log = StuckLog()
        server = self.start_server(["echo"], verbosity=2, log_file=log)
        self.addCleanup(log.released.set)     # runs before server.close
        sock = self.udp_socket()
        target = server.addresses["echo", "udp"][0]
        for number in range(50):        # each is logged at -v
            sock.sendto(b"%d" % number, target)
            self.assertEqual(sock.recv(100), b"%d" % number)
        self.assertTrue(log.entered.wait(TIMEOUT))
        tcp = self.connect(server, "echo")
        tcp.sendall(b"still here")
        self.assertEqual(recv_exactly(tcp, 10), b"still here")


class LogNeverBlocksTest(unittest.TestCase):
    """log() never writes itself: not before the loop, not after close()."""

    def log_in_a_thread(self, server, message):
        caller = threading.Thread(target=server.log, args=(message,))
        caller.daemon = True
        caller.start()
        caller.join(TIMEOUT)
        return not caller.is_alive()

    def test_log_before_the_loop_and_after_close_returns_at_once(self):
        log = StuckLog()
        self.addCleanup(log.released.set)
        self.addCleanup(setattr, diagsvc, "LOG_DRAIN_TIMEOUT",
                        diagsvc.LOG_DRAIN_TIMEOUT)
        diagsvc.LOG_DRAIN_TIMEOUT = 0.1     # close() stops waiting soon
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                port_offset=None, log_file=log)
        self.addCleanup(server.close)
        # No loop yet: the first line gets a writer stuck, the next waits.
        self.assertTrue(self.log_in_a_thread(server, "one"))
        self.assertTrue(log.entered.wait(TIMEOUT))
        self.assertTrue(self.log_in_a_thread(server, "two"))
        server.close()
        self.assertTrue(self.log_in_a_thread(server, "after close"))
        self.assertEqual(server.log_lines_dropped, 1)


class SourceGroupTest(unittest.TestCase):
    """Item 3: per-source limits count an IPv6 /64 as one source."""

    def test_source_group_keys(self):
        group = diagsvc.source_group
        self.assertEqual(group("192.0.2.7"), "192.0.2.7")
        self.assertEqual(group("192.0.2.7", ipv4_prefix=24), "192.0.2.0/24")
        self.assertEqual(group("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(group("2001:db8:1:2::9"), group("2001:db8:1:2:ffff::"))
        self.assertNotEqual(group("2001:db8:1:2::9"), group("2001:db8:1:3::9"))
        self.assertEqual(group("2001:db8::1", ipv6_prefix=128), "2001:db8::1")
        self.assertEqual(group("2001:db8:1:2::9", ipv6_prefix=48),
                         "2001:db8:1::/48")
        self.assertEqual(group("2001:db8::1", ipv6_prefix=0), "::/0")
        self.assertEqual(group("fe80::1%2"), "fe80::/64%2")
        self.assertEqual(group("fe80::1%eth0"), "fe80::/64%eth0")

    def test_prefix_lengths_are_checked(self):
        for options in ({"ipv4_prefix": 33}, {"ipv6_prefix": 129},
                        {"ipv6_prefix": -1}):
            with self.assertRaises(diagsvc.ServerError) as caught:
                diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                               **options)
            self.assertIn("prefix must be 0 to", str(caught.exception))

    def test_one_slash_64_is_one_source_for_every_limit(self):
        hosts = ["fd00:1::%d" % n for n in range(2, 8)]
        result = in_namespace(self, "; ".join(
            ["ip -6 addr add fd00:1::1/64 dev lo nodad",
             "ip -6 addr add fd00:2::1/64 dev lo nodad"] +
            ["ip -6 addr add %s/64 dev lo nodad" % host for host in hosts]),
            """
hosts = %r
def served(server, host):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.settimeout(5.0)
    sock.connect(server.addresses["echo", "tcp"][0])
    sock.sendall(b"x")
    try:
        answer = sock.recv(1)
    except OSError:
        answer = b""
    opened.append(sock)
    return answer == b"x"
result = {}
opened = []
for prefix in (64, 128):
    options = {} if prefix == 64 else {"ipv6_prefix": prefix}  # the default
    try:
        server = diagsvc.Server(["echo", "daytime"], bind=["fd00:1::1"],
                                port_offset=None, max_per_source=3,
                                udp_rate=0.01, udp_burst=3, **options)
    except TypeError as error:
        result[str(prefix)] = str(error)
        continue
    with server:
        server.start()
        tcp = [served(server, host) for host in hosts[:5]]
        other = served(server, "fd00:2::1")
        clients = []
        for host in hosts[:5]:
            udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            udp.bind((host, 0))
            udp.sendto(b"", server.addresses["daytime", "udp"][0])
            clients.append(udp)
        # One loop thread: once a later echo is back, every daytime reply
        # that will ever come is queued.
        marker = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        marker.bind(("fd00:2::1", 0))
        marker.settimeout(5.0)
        marker.sendto(b"marker", server.addresses["echo", "udp"][0])
        assert marker.recv(100) == b"marker"
        marker.close()
        replies = 0
        for udp in clients:
            udp.setblocking(False)
            try:
                udp.recv(100)
                replies += 1
            except BlockingIOError:
                pass
            udp.close()
        stats = server.stats()
        result[str(prefix)] = [tcp.count(True), other, replies,
                               stats["echo", "tcp"]["refusals"],
                               stats["daytime", "udp"]["refusals"]]
    for sock in opened:
        sock.close()
print(json.dumps(result))
""" % (hosts,))
        self.assertEqual(result["64"], [3, True, 3, {"max-per-source": 2},
                                        {"rate-limit": 2}])
        self.assertEqual(result["128"], [5, True, 5, {}, {}])

class ScopeTest(unittest.TestCase):
    """Item 10, the server: scoped IPv6 addresses in --bind and --allow."""

    def test_access_rules_with_a_scope_match_that_scope_only(self):
        # Indices that this host may lack: every index names an interface.
        if hasattr(socket, "if_indextoname"):
            real = socket.if_indextoname
            socket.if_indextoname = lambda index: "if%d" % index
            self.addCleanup(setattr, socket, "if_indextoname", real)
        rules = diagsvc.AccessList(allow=["fe80::1%1", "fe80::/64%3",
                                          "fe80::%4/64", "2001:db8::/32"])
        self.assertTrue(rules.permits("fe80::1%1"))
        self.assertFalse(rules.permits("fe80::1%2"))
        self.assertTrue(rules.permits("fe80::99%3"))
        self.assertTrue(rules.permits("fe80::99%4"))
        self.assertFalse(rules.permits("fe80::99%5"))
        self.assertTrue(rules.permits("2001:db8::1"))
        denied = diagsvc.AccessList(deny=["fe80::1%1"])
        self.assertFalse(denied.permits("fe80::1%1"))
        self.assertTrue(denied.permits("fe80::1%2"))
        unscoped = diagsvc.AccessList(allow=["fe80::/64"])
        self.assertTrue(unscoped.permits("fe80::1%7"))

    @unittest.skipUnless(hasattr(socket, "if_nametoindex") and ON_LINUX,
                         "needs interface names (Linux's lo)")
    def test_access_rules_take_interface_names(self):
        index = socket.if_nametoindex("lo")
        rules = diagsvc.AccessList(allow=["fe80::1%lo"])
        self.assertTrue(rules.permits("fe80::1%%%d" % index))
        self.assertFalse(rules.permits("fe80::1%%%d" % (index + 1)))

    def test_bad_scopes_are_one_line_errors(self):
        for entry, text in (("fe80::1%nosuchif0", "no network interface "
                             "named 'nosuchif0'"),
                            ("192.0.2.1%1", "only an IPv6 address takes a "
                             "scope")):
            with self.assertRaises(diagsvc.ServerError) as caught:
                diagsvc.AccessList(allow=[entry])
            self.assertIn(text, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
        result = run_command("echo", "--port", "echo=0", "--bind",
                             "127.0.0.1", "--allow", "fe80::1%nosuchif0")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, "diagsvc: error: 'fe80::1%nosuchif0':"
                         " no network interface named 'nosuchif0' on this "
                         "host\n")

    def test_bind_and_allow_on_a_link_local_address(self):
        result = in_namespace(self, (
            "ip link add br0 type bridge; ip link set br0 up; "
            "ip link add br1 type bridge; ip link set br1 up; "
            "ip -6 addr add fe80::1/64 dev br0 nodad; "
            "ip -6 addr add fe80::2/64 dev br0 nodad"), """
index = socket.if_nametoindex("br0")
result = {}
for allowed in ("fe80::2%br0", "fe80::2%br1"):
    with diagsvc.Server(["echo"], bind=["fe80::1%br0"], port_offset=None,
                        allow=[allowed]) as server:
        server.start()
        host, port = server.addresses["echo", "udp"][0]
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.bind(("fe80::2", 0, 0, index))
        udp.settimeout(5.0)
        tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        tcp.bind(("fe80::2", 0, 0, index))
        tcp.settimeout(10.0)
        tcp.connect(("fe80::1", server.addresses["echo", "tcp"][0][1], 0,
                     index))
        tcp.sendall(b"scoped")
        try:
            echoed = tcp.recv(100).decode()
        except OSError:                 # refused: closed with data unread
            echoed = ""
        tcp.close()
        udp_echoed = ""
        if allowed.endswith("br1"):     # refused: wait for the count
            udp.sendto(b"scoped", ("fe80::1", port, 0, index))
            deadline = time.monotonic() + 10.0
            while not server.counters["echo", "udp"].refusals and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            for _ in range(3):          # UDP may lose one; a busy host
                udp.sendto(b"scoped", ("fe80::1", port, 0, index))
                try:
                    udp_echoed = udp.recv(100).decode()
                    break
                except socket.timeout:
                    pass
        udp.close()
        result[allowed] = [host, echoed, udp_echoed,
                           server.stats()["echo", "udp"]["refusals"],
                           server.stats()["echo", "tcp"]["refusals"]]
command = subprocess.Popen(
    [sys.executable, SCRIPT_PATH, "echo", "--udp", "--port", "echo=0",
     "--bind", "fe80::1%br0"], stdout=subprocess.PIPE, universal_newlines=True)
result["start line"] = command.stdout.readline().strip()
command.terminate()
command.wait()
command.stdout.close()
print(json.dumps(result))
""".replace("SCRIPT_PATH", repr(SCRIPT)))
        self.assertEqual(result["fe80::2%br0"],
                         ["fe80::1%br0", "scoped", "scoped", {}, {}])
        self.assertEqual(result["fe80::2%br1"],
                         ["fe80::1%br0", "", "", {"denied": 1},
                          {"denied": 1}])
        self.assertTrue(START_LINE.match(result["start line"]))
        self.assertIn("on fe80::1%br0 port", result["start line"])


# --- Trust: descriptors select() cannot watch, one-shot closes, close() ------
# (issue 8, items 4, 5, 6 and 16)

HAVE_SELECT_SELECTOR = hasattr(__import__("selectors"), "SelectSelector")


def open_descriptor_count():
    gc.collect()                # what earlier tests left to the collector
    return len(os.listdir("/proc/self/fd"))


class UnwatchableDescriptorTest(ServerTestCase):
    """select() takes descriptors below FD_SETSIZE only (item 4)."""

    def allow_descriptors(self, needed):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            if hard != resource.RLIM_INFINITY and hard < needed:
                self.skipTest("RLIMIT_NOFILE hard limit below %d" % needed)
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE,
                            (soft, hard))

    def hold_descriptors_up_to(self, highest):
        """What a library user's process holding many open files looks
        like: every free descriptor up to ``highest`` is taken."""
        held = []
        self.addCleanup(lambda: [os.close(fd) for fd in held])
        while not held or held[-1] < highest:
            held.append(os.open(os.devnull, os.O_RDONLY))
        return held

    @unittest.skipUnless(ON_LINUX and HAVE_SELECT_SELECTOR,
                         "needs Linux's FD_SETSIZE of 1024 on values")
    def test_select_refuses_descriptors_past_fd_setsize_and_serves_on(self):
        import selectors
        self.allow_descriptors(1300)
        server = self.start_server(["echo"], transports=["tcp"],
                                   selector=selectors.SelectSelector,
                                   max_per_source=0)
        self.assertEqual(server.max_connections,
                         diagsvc.SELECT_LIMIT - diagsvc.DESCRIPTOR_RESERVE)
        # The process now holds 1,100 files, so the next accept lands above
        # FD_SETSIZE.
        held = self.hold_descriptors_up_to(1100)
        high = self.connect(server, "echo")
        self.assertEqual(high.recv(100), b"")       # refused at once
        self.assertEqual(server.counters["echo", "tcp"].refusals,
                         {"unwatchable": 1})
        # Still serving: free one low descriptor, and the next connection
        # (its client socket made before, so high) is accepted into it.
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(TIMEOUT)
        self.assertGreater(client.fileno(), 1024)
        os.close(held.pop(0))
        client.connect(server.addresses["echo", "tcp"][0])
        client.sendall(b"low descriptor")
        self.assertEqual(recv_exactly(client, 14), b"low descriptor")
        self.assertTrue(server._running)
        self.assertEqual(server.counters["echo", "tcp"].connections, 1)

    @unittest.skipUnless(ON_LINUX and HAVE_SELECT_SELECTOR,
                         "needs Linux's FD_SETSIZE of 1024 on values")
    def test_select_server_started_in_a_crowded_process(self):
        # Its own sockets (many --bind addresses, or many open files) past
        # FD_SETSIZE: a ServerError at construction, nothing left open.
        import selectors
        self.allow_descriptors(1300)
        self.hold_descriptors_up_to(1100)
        before = open_descriptor_count()
        with self.assertRaisesRegex(diagsvc.ServerError,
                                    r"^cannot watch the wake-up socket: "
                                    r"select\(\) takes descriptors below "
                                    r"FD_SETSIZE \(1024\), and this one is "
                                    r"\d+; use --selector PollSelector"):
            diagsvc.Server(["echo", "chargen"], bind=["127.0.0.1"],
                           port_offset=None, selector=selectors.SelectSelector)
        self.assertEqual(open_descriptor_count(), before)

    @unittest.skipUnless(ON_LINUX and HAVE_SELECT_SELECTOR,
                         "needs Linux's FD_SETSIZE of 1024 on values")
    def test_select_drops_what_it_cannot_watch_and_carries_on(self):
        # Something registered past FD_SETSIZE anyway (here by hand): the
        # selector raises; the loop logs it, drops it, and serves on.
        import selectors
        self.allow_descriptors(1300)
        log = io.StringIO()
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                port_offset=None, transports=["udp"],
                                selector=selectors.SelectSelector,
                                log_file=log)
        self.addCleanup(server.close)
        self.hold_descriptors_up_to(1100)
        high_reader, high_writer = socket.socketpair()
        self.addCleanup(high_reader.close)
        self.addCleanup(high_writer.close)
        self.assertGreaterEqual(high_reader.fileno(), 1024)

        class Unwatchable(object):
            sock = high_reader

            def on_event(self, events):
                pass
        server.selector.register(high_reader, diagsvc.EVENT_READ,
                                 Unwatchable())
        server.start()
        self.assertEqual(self.udp_exchange(server, "echo", b"alive"), b"alive")
        self.assertTrue(server._running)
        server.close()                  # writes out what the log queue holds
        self.assertIn("filedescriptor out of range in select()", log.getvalue())
        self.assertIn("dropped 1 descriptor(s) the selector cannot watch",
                      log.getvalue())

    @unittest.skipUnless(HAVE_SELECT_SELECTOR, "no SelectSelector")
    def test_select_cap_is_fd_setsize_less_the_reserve(self):
        import selectors
        cap = diagsvc.default_max_connections(selectors.SelectSelector)
        self.assertLessEqual(cap, diagsvc.SELECT_LIMIT - 32)
        self.assertEqual(diagsvc.SELECT_LIMIT,
                         512 if sys.platform == "win32" else 1024)
        with self.assertRaisesRegex(diagsvc.ServerError,
                                    r"^--max-connections 5000 is more than "
                                    r"select\(\) can watch here \(at most "
                                    r"%d" % cap):
            diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                           selector=selectors.SelectSelector,
                           max_connections=5000)
        result = run_command("echo", "--tcp", "--bind", "127.0.0.1", "--port",
                             "echo=0", "--selector", "SelectSelector",
                             "--max-connections", "5000")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("more than select() can watch", result.stderr)

    def test_a_selector_error_is_logged_never_silent(self):
        selector_class = diagsvc.SELECTORS[0]

        class FailingSelector(selector_class):
            fail = False

            def select(self, timeout=None):
                if self.fail:
                    raise RuntimeError("injected selector failure")
                return selector_class.select(self, timeout)

        log = io.StringIO()
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                port_offset=None, selector=FailingSelector,
                                log_file=log)
        self.addCleanup(server.close)
        outcome = []

        def run():
            try:
                server.serve_forever()
                outcome.append("returned")
            except RuntimeError as error:
                outcome.append(str(error))
        loop = threading.Thread(target=run)
        loop.daemon = True
        loop.start()
        self.assertEqual(self.udp_exchange(server, "echo", b"up"), b"up")
        server.selector.fail = True
        server._waker.wake()
        loop.join(TIMEOUT)
        self.assertEqual(outcome, ["injected selector failure"])
        server.close()                  # writes out what the log queue holds
        self.assertIn("injected selector failure", log.getvalue())
        self.assertIn("the event loop stops", log.getvalue())


class OneShotCloseTest(ServerTestCase):
    """daytime, qotd, time: the whole reply, then FIN, never RST (item 5)."""

    def check_reply(self, server, service, reply):
        if service == "daytime":
            self.assertRegex(reply, DAYTIME)
        elif service == "qotd":
            self.assertIn(reply, server.quotes)
        else:
            self.assertEqual(len(reply), 4)

    def read_reply_and_eof(self, sock):
        """The reply and a normal close; a reset raises here."""
        reply = recv_to_eof(sock)
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
                         0, "the server reset the connection")
        return reply

    def test_input_already_queued_at_accept(self):
        # Deterministic: the clients' data is queued before the loop runs,
        # as it is when a client sends at once and the server is busy.
        services = ["daytime", "qotd", "time"]
        server = diagsvc.Server(services, bind=["127.0.0.1"],
                                port_offset=None, transports=["tcp"])
        self.addCleanup(server.close)
        clients = []
        for service in services:
            for _ in range(10):
                sock = socket.create_connection(
                    server.addresses[service, "tcp"][0], TIMEOUT)
                self.addCleanup(sock.close)
                sock.sendall(b"n" * 100)        # as nmap and ncat may
                clients.append((service, sock))
        server.start()
        for service, sock in clients:
            with self.subTest(service=service):
                self.check_reply(server, service, self.read_reply_and_eof(sock))
                sock.close()
        wait_until(lambda: not server.streams,
                   message="the one-shot connections to close")
        for service in services:
            counters = server.counters[service, "tcp"]
            self.assertEqual(counters.bytes_in, 1000)
            self.assertEqual(counters.refusals, {})

    def test_client_that_sends_at_once_many_times(self):
        server = self.start_server(["daytime", "qotd", "time"],
                                   transports=["tcp"], max_per_source=0)
        for service in ("daytime", "qotd", "time"):
            address = server.addresses[service, "tcp"][0]
            with self.subTest(service=service):
                for _ in range(200):
                    with socket.create_connection(address, TIMEOUT) as sock:
                        sock.sendall(b"x" * 100)
                        self.check_reply(server, service,
                                         self.read_reply_and_eof(sock))

    def test_a_client_that_never_closes_gets_eof_and_is_let_go(self):
        # What matters is that the linger ends, not its 2 s: a short one,
        # looked at by sweeps ten times a second, not once.
        for name, value in (("ONE_SHOT_LINGER", 0.2), ("MAX_TIMER_WAIT", 0.1)):
            self.addCleanup(setattr, diagsvc, name, getattr(diagsvc, name))
            setattr(diagsvc, name, value)
        server = self.start_server(["time"], transports=["tcp"])
        sock = self.connect(server, "time")
        self.assertEqual(len(recv_to_eof(sock)), 4)     # FIN came at once
        wait_until(lambda: server.counters["time", "tcp"].connections,
                   message="the connection to be counted")
        wait_until(lambda: not server.streams,
                   timeout=diagsvc.ONE_SHOT_LINGER + TIMEOUT,
                   message="the linger to end")
        self.assertEqual(server.counters["time", "tcp"].refusals, {})


class CloseTest(unittest.TestCase):
    """close(): from any thread, any number of times, whoever runs the
    loop; when it returns no loop runs and every descriptor is closed
    (item 6)."""

    def make_server(self, **options):
        server = diagsvc.Server(["echo", "chargen"], bind=["127.0.0.1"],
                                port_offset=None, **options)
        self.addCleanup(server.close)
        return server

    def sockets_of(self, server):
        return [h.sock for h in server.listeners + server.endpoints] + [
            s.sock for s in server.streams]

    def test_close_stops_a_loop_that_a_user_thread_runs(self):
        for _ in range(5):
            server = self.make_server()
            # No timer for an hour: only close() can end the loop's wait.
            server._next_timer = time.monotonic() + 3600
            loop = threading.Thread(target=server.serve_forever)
            loop.daemon = True
            loop.start()
            client = socket.create_connection(
                server.addresses["chargen", "tcp"][0], TIMEOUT)
            self.addCleanup(client.close)
            self.assertEqual(len(recv_exactly(client, 100)), 100)
            sockets = self.sockets_of(server)
            server.close()
            self.assertFalse(server._running,
                             "the loop still ran after close() returned")
            for sock in sockets:
                self.assertEqual(sock.fileno(), -1)
            loop.join(TIMEOUT)
            self.assertFalse(loop.is_alive())

    @unittest.skipUnless(ON_LINUX, "counts descriptors in /proc")
    def test_close_from_many_threads_at_once(self):
        before = open_descriptor_count()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)         # interleave the closers finely
        self.addCleanup(sys.setswitchinterval, interval)
        errors = []
        for _ in range(10):
            server = self.make_server()
            server.start()
            client = socket.create_connection(
                server.addresses["chargen", "tcp"][0], TIMEOUT)
            recv_exactly(client, 100)
            barrier = threading.Barrier(8)

            def close():
                barrier.wait(TIMEOUT)
                try:
                    server.close()
                except BaseException as error:      # noqa: B902
                    errors.append(error)
            closers = [threading.Thread(target=close) for _ in range(8)]
            for closer in closers:
                closer.start()
            for closer in closers:
                closer.join(TIMEOUT)
            client.close()
            self.assertEqual(errors, [])
            self.assertFalse(server._running)
        sys.setswitchinterval(interval)
        self.assertEqual(open_descriptor_count(), before)

    def test_close_before_serve_forever_ever_ran(self):
        server = self.make_server()
        server.close()
        server.close()
        outcome = []

        def run():
            try:
                server.serve_forever()
                outcome.append("returned")
            except Exception as error:
                outcome.append(error)
        loop = threading.Thread(target=run)
        loop.daemon = True
        loop.start()
        loop.join(TIMEOUT)
        self.assertEqual(outcome, ["returned"])
        self.assertIs(server.start(), server)       # a thread that returns
        server.close()

    def test_close_from_a_handler_in_the_loop_thread(self):
        server = self.make_server()
        reader, writer = socket.socketpair()
        self.addCleanup(reader.close)
        self.addCleanup(writer.close)
        done = threading.Event()
        errors = []

        class CloseOnEvent(object):
            sock = reader

            def on_event(self, events):
                reader.recv(10)
                try:
                    server.close()
                except BaseException as error:      # noqa: B902
                    errors.append(error)
                done.set()
        server.selector.register(reader, diagsvc.EVENT_READ, CloseOnEvent())
        sockets = self.sockets_of(server)
        thread = server.start()._thread
        writer.send(b"x")
        self.assertTrue(done.wait(TIMEOUT))
        self.assertEqual(errors, [])
        # On the loop's thread close() only asks; serve_forever() closes
        # every descriptor before it returns.
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive())
        for sock in sockets:
            self.assertEqual(sock.fileno(), -1)
        server.close()

    @unittest.skipUnless(hasattr(__import__("signal"), "SIGUSR2") and
                         ON_LINUX, "needs SIGUSR2")
    def test_close_from_a_signal_handler_while_the_loop_runs_here(self):
        import signal
        server = self.make_server()
        sockets = self.sockets_of(server)
        previous = signal.signal(signal.SIGUSR2,
                                 lambda signum, frame: server.close())
        self.addCleanup(signal.signal, signal.SIGUSR2, previous)

        def signal_once_running():
            wait_until(lambda: server._running, message="the loop to run")
            os.kill(os.getpid(), signal.SIGUSR2)
        sender = threading.Thread(target=signal_once_running)
        sender.start()
        server.serve_forever()              # in this, the main thread
        sender.join()
        for sock in sockets:
            self.assertEqual(sock.fileno(), -1)


class ConstructionTest(unittest.TestCase):
    """Every OSError while constructing is a one-line ServerError, and
    nothing is left open (item 16)."""

    @unittest.skipUnless(ON_LINUX, "counts descriptors in /proc")
    def test_os_errors_become_server_error_and_leak_nothing(self):
        selector_class = diagsvc.SELECTORS[0]

        class NoSelector(selector_class):
            def __init__(self):
                raise OSError(errno.EMFILE, "Too many open files")

        class RefusingSelector(selector_class):
            def register(self, fileobj, events, data=None):
                if len(self.get_map()) >= 2:
                    raise OSError(errno.ENOMEM, "Cannot allocate memory")
                return selector_class.register(self, fileobj, events, data)

        for selector, text in ((NoSelector, "Too many open files"),
                               (RefusingSelector, "Cannot allocate memory")):
            with self.subTest(selector=selector.__name__):
                before = open_descriptor_count()
                with self.assertRaises(diagsvc.ServerError) as caught:
                    diagsvc.Server(["chargen", "echo"], bind=["127.0.0.1"],
                                   port_offset=None, selector=selector)
                self.assertEqual(str(caught.exception),
                                 "cannot start: " + text)
                self.assertEqual(open_descriptor_count(), before)

    def test_max_output_above_the_read_buffer(self):
        big = diagsvc.STREAM_BUFFER_SIZE * 4
        with diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                            transports=["tcp"], max_output=big) as server:
            self.assertEqual(server.max_output, big)
            server.start()
            with socket.create_connection(server.addresses["echo", "tcp"][0],
                                          TIMEOUT) as sock:
                sock.sendall(b"before")
                self.assertEqual(recv_exactly(sock, 6), b"before")
                # Changed while a connection is open: it goes on echoing.
                server.max_output = big * 2
                payload = os.urandom(1 << 20)
                sender = threading.Thread(target=lambda: (
                    sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
                sender.start()
                received = recv_to_eof(sock)
                sender.join()
                self.assertTrue(received == payload)
            self.assertEqual(server.counters["echo", "tcp"].refusals, {})

    @unittest.skipIf(sys.platform == "win32", "signals")
    def test_counters_at_exit_unless_quiet(self):
        for quiet in ([], ["-q"]):
            with self.subTest(quiet=quiet):
                server = ServerProcess("echo", "--udp", "--bind", "127.0.0.1",
                                       "--port", "echo=0", *quiet)
                self.addCleanup(server.kill)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(TIMEOUT)
                    sock.sendto(b"count", server.addresses["echo", "udp"][0])
                    self.assertEqual(sock.recv(100), b"count")
                process = server.process
                process.terminate()
                self.assertEqual(process.wait(TIMEOUT), 0)
                log = process.stderr.read()
                process.stdout.close()
                process.stderr.close()
                counted = "echo/udp: 1 datagrams, 5 bytes in, 5 bytes out"
                if quiet:
                    self.assertNotIn(counted, log)
                else:
                    self.assertIn(counted, log)


# --- The help a person reads first (issue 12, part 5) -----------------------


class HelpTest(unittest.TestCase):

    def test_usage_names_the_client_commands(self):
        result = run_command("--help")
        usage = result.stdout.split("\n\n")[0]
        self.assertIn("diagsvc probe HOST", usage)
        self.assertIn("diagsvc measure HOST", usage)
        self.assertIn("--for DURATION", result.stdout)

    def test_client_help_explains_every_argument_with_an_example(self):
        for command in ("probe", "measure"):
            with self.subTest(command=command):
                parser = diagsvc._client_parser(command)
                for action in parser._actions:
                    self.assertTrue(action.help, "no help for %s" % (
                        action.option_strings or action.dest))
                result = run_command(command, "--help")
                self.assertEqual(result.returncode, 0)
                self.assertRegex(result.stdout, r"\n  HOST +\S")
                self.assertIn("example:\n  python3 diagsvc.py " + command,
                              result.stdout)



# --- Running as a service: systemd, sd_notify, --for (issue 12) -------------

SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"

# Sets LISTEN_* by hand the way systemd does, then execs diagsvc: the
# descriptors given in argv[1] become 3, 4, ...; LISTEN_PID is this
# process, which exec keeps.  argv[2] is LISTEN_FDNAMES ("-": unset).
ACTIVATE = r"""
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
if sys.argv[2] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.executable, [sys.executable] + sys.argv[3:])
"""


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    """A port free now (bound to 0, then closed: a tiny race, accepted)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LineReader(object):
    """Lines from a pipe, each waited for with a deadline, never forever."""

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        self.buffer = b""

    def line(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError("no line within %s s; so far %r" % (
                    timeout, self.buffer))
            chunk = os.read(self.fd, 4096)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line.decode()
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode() + "\n"


class LaunchedServer(object):
    """A diagsvc process started by some launcher; start lines parsed."""

    def __init__(self, command, pass_fds=(), env=None):
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=pass_fds, env=env)
        self.stdout = LineReader(self.process.stdout)
        self.stderr = LineReader(self.process.stderr)
        self.addresses = {}
        self.lines = []

    def read_start_lines(self):
        while True:
            line = self.stdout.line()
            if not line:
                raise AssertionError("server exited: %r" % (
                    self.process.stderr.read(),))
            self.lines.append(line.rstrip("\n"))
            match = START_LINE.match(line.rstrip("\n"))
            if match:
                service, transport, host, port = match.groups()
                self.addresses.setdefault((service, transport), []).append(
                    (host, int(port)))
            elif line.startswith("diagsvc: running as"):
                return self

    def wait(self):
        try:
            return self.process.wait(TIMEOUT)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()

    def stop(self):
        import signal
        self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.wait()


def activated(sockets, names, *args):
    """diagsvc over sockets passed the way systemd passes them."""
    for sock in sockets:
        sock.set_inheritable(True)
    fds = [sock.fileno() for sock in sockets]
    return LaunchedServer(
        [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), names,
         SCRIPT] + list(args), pass_fds=fds)


def listening(host="127.0.0.1", port=0):
    sock = sock_from(host, port)
    sock.listen(16)
    return sock


class ActivationEnvironmentTest(unittest.TestCase):
    """The pure parts: sd_listen_fds(3)'s variables, --for's durations."""

    def test_listen_fds_follows_sd_listen_fds(self):
        listen = diagsvc._listen_fds
        self.assertEqual(listen({}, 42), [])
        # For another process (a parent's, inherited): not ours.
        self.assertEqual(listen({"LISTEN_PID": "41", "LISTEN_FDS": "2"}, 42),
                         [])
        self.assertEqual(listen({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42),
                         [(3, None), (4, None)])
        self.assertEqual(listen({"LISTEN_PID": "42", "LISTEN_FDS": "3",
                                 "LISTEN_FDNAMES": "echo::diagsvc.socket"},
                                42),
                         [(3, "echo"), (4, None), (5, "diagsvc.socket")])
        for bad, text in (({"LISTEN_FDS": "x"}, "not a number"),
                          ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "echo"},
                           "1 names for LISTEN_FDS=2")):
            bad["LISTEN_PID"] = "42"
            with self.assertRaisesRegex(diagsvc.ServerError, text):
                listen(bad, 42)

    def test_variables_are_removed_once_read(self):
        for environ in ({"LISTEN_PID": "1", "LISTEN_FDS": "1",
                         "LISTEN_FDNAMES": "echo", "PATH": "/bin"},
                        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0",
                         "PATH": "/bin"},
                        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x",
                         "PATH": "/bin"}):
            with self.subTest(environ=dict(environ)):
                try:
                    self.assertIsNone(diagsvc._take_passed_sockets(environ))
                except diagsvc.ServerError:
                    pass
                self.assertEqual(environ, {"PATH": "/bin"})

    def test_ipv4_on_a_dual_stack_socket_is_judged_as_ipv4(self):
        self.assertTrue(diagsvc._is_group_address("::ffff:224.0.0.1"))
        self.assertTrue(diagsvc._is_group_address("::ffff:255.255.255.255"))
        self.assertFalse(diagsvc._is_group_address("::ffff:192.0.2.1"))
        mapped = b"\0" * 10 + b"\xff\xff"
        self.assertTrue(diagsvc._is_group_destination(mapped + b"\xe0\0\0\1"))
        self.assertFalse(diagsvc._is_group_destination(mapped + b"\x7f\0\0\1"))
        self.assertTrue(diagsvc._is_group_destination(b"\xff" + b"\0" * 15))
        access = diagsvc.AccessList(allow=["127.0.0.0/8"])
        self.assertTrue(access.permits("::ffff:127.0.0.1"))
        self.assertFalse(access.permits("::ffff:192.0.2.1"))
        # Per-source limits: one IPv4 client each, not all of them in ::/64.
        self.assertEqual(diagsvc.source_group("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(diagsvc.source_group("::ffff:192.0.2.7", 24),
                         "192.0.2.0/24")

    def test_durations(self):
        for text, seconds in (("90s", 90), ("30m", 1800), ("2h", 7200),
                              ("1.5", 1.5), ("45", 45), ("0.5S", 0.5)):
            with self.subTest(text=text):
                self.assertEqual(diagsvc.parse_duration(text), seconds)
        for text in ("", "0", "-5s", "10x", "m", "nan", "inf", "1e300",
                     "1e9h"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, diagsvc.parse_duration, text)


class PassedSocketTest(ServerTestCase):
    """Server(sockets=...): served exactly as the sockets it binds."""

    def test_matched_by_name_or_port_and_served(self):
        echo_tcp, time_tcp = listening(), listening()
        echo_udp = sock_from("127.0.0.1", kind=socket.SOCK_DGRAM)
        # time by its port: systemd names an unnamed socket after its unit.
        offset = time_tcp.getsockname()[1] - 37
        server = diagsvc.Server(
            sockets=[(echo_tcp, "echo"), (time_tcp, "diagsvc.socket"),
                     (echo_udp, "echo")], port_offset=offset)
        self.addCleanup(server.close)
        server.start()
        self.assertEqual(server.services, ["echo", "time"])
        self.assertEqual(server.addresses["echo", "tcp"],
                         [echo_tcp.getsockname()])
        self.assertEqual(server.addresses["time", "tcp"],
                         [time_tcp.getsockname()])
        self.assertEqual(server.addresses["time", "udp"], [])
        self.assertEqual(self.udp_exchange(server, "echo", b"dgram"), b"dgram")
        with self.connect(server, "echo") as sock:
            sock.sendall(b"stream")
            self.assertEqual(recv_exactly(sock, 6), b"stream")
        with self.connect(server, "time") as sock:
            self.assertEqual(len(recv_to_eof(sock)), 4)
        server.close()
        self.assertEqual(echo_tcp.fileno(), -1, "the server owns them")

    def test_limits_and_lists_apply(self):
        server = diagsvc.Server(
            sockets=[(listening(), "echo"), (listening(), "discard"),
                     (sock_from("127.0.0.1", kind=socket.SOCK_DGRAM),
                      "echo")],
            max_per_source=1, deny=["127.0.0.1"])
        self.addCleanup(server.close)
        server.start()
        with self.connect(server, "echo") as sock:
            self.assertEqual(sock.recv(100), b"")
        sock = self.udp_socket(timeout=0.5)
        sock.sendto(b"x", server.addresses["echo", "udp"][0])
        wait_until(lambda: server.counters["echo", "udp"].refusals,
                   message="the UDP refusal")
        self.assertEqual(server.counters["echo", "udp"].refusals,
                         {"denied": 1})
        self.assertEqual(server.counters["echo", "tcp"].refusals,
                         {"denied": 1})
        server.close()
        server = diagsvc.Server(sockets=[(listening(), "discard")],
                                max_per_source=1)
        self.addCleanup(server.close)
        server.start()
        first = self.connect(server, "discard")
        wait_until(lambda: server.streams, message="the first connection")
        with self.connect(server, "discard") as second:
            self.assertEqual(second.recv(100), b"")
        self.assertEqual(server.counters["discard", "tcp"].refusals,
                         {"max-per-source": 1})
        first.close()

    @unittest.skipUnless(HAVE_IPV6, "no IPv6 here")
    def test_dual_stack_socket_lists_see_ipv4_clients(self):
        # systemd's ListenStream=7 is one [::] socket for both families:
        # an IPv4 client arrives as ::ffff:127.0.0.1.
        for allow, deny, served in ((["127.0.0.1"], [], True),
                                    ([], ["127.0.0.0/8"], False)):
            with self.subTest(allow=allow, deny=deny):
                dual = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                dual.bind(("::", 0))
                server = diagsvc.Server(sockets=[(dual, "echo")],
                                        allow=allow, deny=deny)
                self.addCleanup(server.close)
                server.start()
                port = server.addresses["echo", "udp"][0][1]
                sock = self.udp_socket()
                sock.sendto(b"v4", ("127.0.0.1", port))
                if served:
                    self.assertEqual(sock.recv(100), b"v4")
                else:
                    wait_until(lambda: server.counters[
                        "echo", "udp"].refusals, message="the refusal")
                    self.assertEqual(server.counters["echo", "udp"].refusals,
                                     {"denied": 1})
                server.close()

    @needs_linux
    def test_wildcard_udp_socket_passed_in_replies_from_its_destination(self):
        wildcards = [(socket.AF_INET, "0.0.0.0", 4)]
        if HAVE_IPV6:                   # systemd's dual-stack [::] too
            wildcards.append((socket.AF_INET6, "::", 6))
        for family, host, pktinfo in wildcards:
            with self.subTest(host=host):
                wildcard = socket.socket(family, socket.SOCK_DGRAM)
                if family == socket.AF_INET6:
                    wildcard.setsockopt(socket.IPPROTO_IPV6,
                                        socket.IPV6_V6ONLY, 0)
                wildcard.bind((host, 0))
                server = diagsvc.Server(sockets=[(wildcard, "echo")])
                self.addCleanup(server.close)
                server.start()
                self.assertEqual(server.endpoints[0].pktinfo, pktinfo)
                sock = self.udp_socket()
                sock.connect(("127.0.0.2",
                              server.addresses["echo", "udp"][0][1]))
                sock.send(b"via 127.0.0.2")
                self.assertEqual(sock.recv(100), b"via 127.0.0.2")
                server.close()

    def test_sockets_it_cannot_serve_raise_and_are_closed(self):
        unix = None
        if hasattr(socket, "AF_UNIX"):
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        not_listening = sock_from("127.0.0.1")
        cases = [
            ([(listening(), None)], {}, "matches no service: name it"),
            ([(listening(), "echo")], {"services": ["time"]},
             "echo is not among the services asked for"),
            ([(sock_from("127.0.0.1", kind=socket.SOCK_DGRAM), "echo")],
             {"transports": ("tcp",)}, "only tcp was asked for"),
            ([(listening(), "echo")], {"bind": ["127.0.0.1"]},
             "--bind has no meaning"),
        ]
        if hasattr(socket, "SO_ACCEPTCONN"):
            cases.append(([(not_listening, "echo")], {},
                          "is not listening; pass listening sockets"))
        if unix is not None:
            cases.append(([(unix, "echo")], {}, "not an IPv4 or IPv6"))
        for sockets, options, text in cases:
            with self.subTest(text=text):
                with self.assertRaisesRegex(diagsvc.ServerError, text):
                    diagsvc.Server(sockets=sockets, **options)
                self.assertEqual(sockets[0][0].fileno(), -1)


class ServeForDurationTest(ServerTestCase):
    """--for / Server(duration=): serve for a while, then close everything."""

    def test_a_duration_without_a_datable_end_is_refused(self):
        for duration in (float("nan"), float("inf"), 1e300, -1):
            with self.subTest(duration=duration):
                with self.assertRaisesRegex(diagsvc.ServerError,
                                            "--for must be 0 to"):
                    diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                   port_offset=None, duration=duration)

    def test_duration_returns_from_serve_forever(self):
        # The window counts from the constructor: so does the stopwatch
        # (a loaded machine may take a while to build the server).
        started = time.monotonic()
        server = diagsvc.Server(["time"], bind=["127.0.0.1"],
                                port_offset=None, duration=0.3)
        self.addCleanup(server.close)
        server.serve_forever()          # in this thread: it must return
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertEqual((server.listeners, server.endpoints), ([], []))

    def test_at_the_end_every_socket_is_closed(self):
        # The loop wakes ten times a second, not once: the end below is
        # seen sooner; what is tested is what the end closes.
        self.addCleanup(setattr, diagsvc, "MAX_TIMER_WAIT",
                        diagsvc.MAX_TIMER_WAIT)
        diagsvc.MAX_TIMER_WAIT = 0.1
        server = self.start_server(["echo"], duration=3600.0)
        self.assertLess(abs(server.stops_at - time.time() - 3600), TIMEOUT)
        address = server.addresses["echo", "tcp"][0]
        client = self.connect(server, "echo")
        client.sendall(b"in the window")
        self.assertEqual(recv_exactly(client, 13), b"in the window")
        # The hour is up: bring the end forward rather than wait for it
        # (the loop's timers look at it at least every MAX_TIMER_WAIT).
        server._stop_deadline = time.monotonic()
        server._thread.join(TIMEOUT)
        self.assertFalse(server._thread.is_alive())
        self.assertEqual(client.recv(100), b"", "connections are closed")
        self.assertEqual((server.listeners, server.endpoints), ([], []))
        probe = socket.socket()
        self.addCleanup(probe.close)
        self.assertRaises(ConnectionRefusedError, probe.connect, address)


class NotifyListener(object):
    """The service manager's end of NOTIFY_SOCKET: a datagram socket."""

    def __init__(self, test, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        if abstract:
            name = "diagsvc-test-%s" % os.urandom(6).hex()
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            directory = tempfile.mkdtemp()
            test.addCleanup(os.rmdir, directory)
            self.address = os.path.join(directory, "notify")
            self.sock.bind(self.address)
            test.addCleanup(os.unlink, self.address)
        self.sock.settimeout(TIMEOUT)
        self.messages = []
        self.unread = []

    def wait_for(self, field):
        """The next line FIELD=... not yet taken, read with a deadline."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            for line in self.unread:
                if line.startswith(field + "="):
                    self.unread.remove(line)
                    return line
            if time.monotonic() > deadline:
                raise AssertionError("no %s= within %s s" % (field, TIMEOUT))
            message = self.sock.recv(4096).decode()
            self.messages.append(message)
            self.unread.extend(message.split("\n"))


@unittest.skipUnless(hasattr(socket, "AF_UNIX"), "no AF_UNIX sockets")
class NotifyTest(unittest.TestCase):

    def test_ready_status_watchdog_and_stopping(self):
        kinds = [False] + ([True] if ON_LINUX else [])
        for abstract in kinds:
            with self.subTest(abstract=abstract):
                listener = NotifyListener(self, abstract)
                env = dict(os.environ, NOTIFY_SOCKET=listener.address,
                           WATCHDOG_USEC="400000")
                server = LaunchedServer(
                    [sys.executable, SCRIPT, "echo", "--bind", "127.0.0.1",
                     "--port", "echo=0", "--user", "root", "-q"], env=env)
                self.addCleanup(server.kill)
                server.read_start_lines()
                self.assertEqual(listener.wait_for("READY"), "READY=1")
                status = listener.wait_for("STATUS")
                self.assertRegex(status, r"^STATUS=serving echo on 2 sockets; "
                                 r"0 connections open; 0 connections, 0 "
                                 r"datagrams, 0 refused so far$")
                for _ in range(2):      # at half of WATCHDOG_USEC, again
                    self.assertEqual(listener.wait_for("WATCHDOG"),
                                     "WATCHDOG=1")
                import signal
                server.process.send_signal(signal.SIGTERM)
                self.assertEqual(listener.wait_for("STOPPING"), "STOPPING=1")
                self.assertEqual(server.wait(), 0)

    def test_status_is_refreshed_with_the_counters(self):
        listener = NotifyListener(self)
        original = diagsvc.STATUS_INTERVAL
        diagsvc.STATUS_INTERVAL = 0.05
        self.addCleanup(setattr, diagsvc, "STATUS_INTERVAL", original)
        notifier = diagsvc.SystemdNotifier.from_environment(
            {"NOTIFY_SOCKET": listener.address})
        self.addCleanup(notifier.close)
        self.assertIsNone(notifier.watchdog_interval)
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                                transports=("udp",), notifier=notifier)
        self.addCleanup(server.close)
        server.start()
        self.assertEqual(listener.wait_for("READY"), "READY=1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.sendto(b"count", server.addresses["echo", "udp"][0])
            self.assertEqual(sock.recv(100), b"count")
        deadline = time.monotonic() + TIMEOUT
        while "1 datagrams" not in listener.wait_for("STATUS"):
            self.assertLess(time.monotonic(), deadline, "never counted")
        self.assertNotIn("WATCHDOG=1", listener.messages)

    def test_watchdog_only_for_this_process(self):
        make = diagsvc.SystemdNotifier.from_environment
        for environ, interval in (
                ({"WATCHDOG_USEC": "400000"}, 0.2),
                ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "42"}, 0.2),
                ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "41"}, None),
                ({"WATCHDOG_USEC": "0"}, None), ({}, None)):
            environ["NOTIFY_SOCKET"] = "@diagsvc-unused"
            notifier = make(environ, pid=42)
            self.addCleanup(notifier.close)
            self.assertEqual(notifier.watchdog_interval, interval)
        self.assertIsNone(make({"NOTIFY_SOCKET": "vsock:2:1"}))
        self.assertIsNone(make({}))


@unittest.skipIf(sys.platform == "win32", "systemd's interfaces are Unix")
class ActivationCommandLineTest(unittest.TestCase):

    def launch(self, server):
        self.addCleanup(server.kill)
        return server

    @needs_linux
    def test_hand_passed_sockets_served_after_the_privilege_drop(self):
        tcp, udp = listening(), sock_from("127.0.0.1", kind=socket.SOCK_DGRAM)
        self.addCleanup(tcp.close)
        self.addCleanup(udp.close)
        server = self.launch(activated([tcp, udp], "echo:echo", "-q"))
        server.read_start_lines()
        self.assertEqual(server.addresses, {
            ("echo", "tcp"): [tcp.getsockname()],
            ("echo", "udp"): [udp.getsockname()]})
        if os.geteuid() == 0:
            self.assertIn("running as user nobody", server.lines[-1])
        with socket.create_connection(tcp.getsockname(), TIMEOUT) as sock:
            sock.sendall(b"passed")
            self.assertEqual(recv_exactly(sock, 6), b"passed")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.sendto(b"passed", udp.getsockname())
            self.assertEqual(sock.recv(100), b"passed")
        # Close-on-exec now: a program it started would not hold them.
        for fd in (3, 4):
            with open("/proc/%d/fdinfo/%d" % (server.process.pid, fd)) as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
            self.assertTrue(flags & 0o2000000, "fd %d lacks O_CLOEXEC" % fd)
        self.assertEqual(server.stop(), 0)

    def test_unmatched_socket_exits_2_with_one_line(self):
        tcp = listening()
        self.addCleanup(tcp.close)
        server = self.launch(activated([tcp], "-", "--port-offset", "1"))
        self.assertEqual(server.stderr.line(), (
            "diagsvc: error: the passed socket on fd 3 (tcp on 127.0.0.1 port "
            "%d) matches no service: name it after one with "
            "FileDescriptorName= (echo, discard, daytime, qotd, chargen, "
            "time), or listen on a service's standard port or that plus "
            "--port-offset\n" % tcp.getsockname()[1]))
        self.assertEqual(server.stderr.line(), "")      # and nothing else
        self.assertEqual(server.wait(), 2)

    def test_for_with_passed_sockets(self):
        tcp = listening()
        self.addCleanup(tcp.close)
        server = self.launch(activated([tcp], "qotd", "--for", "0.5",
                                       "--user", "root"))
        server.read_start_lines()
        self.assertRegex(server.lines[-2], r"^diagsvc: stops at \S+, after "
                         r"0\.5 s \(--for\)$")
        self.assertEqual(server.wait(), 0)

    def systemd_socket_activate(self, listen, names, *args):
        if not os.path.exists(SOCKET_ACTIVATE):
            self.skipTest("no systemd-socket-activate here")
        command = [SOCKET_ACTIVATE]
        for address in listen:
            command += ["-l", address]
        command += ["--fdname=" + names] + list(args)
        server = self.launch(LaunchedServer(command))
        for _ in listen:                # "Listening on ADDRESS as FD."
            self.assertIn("Listening on", server.stderr.line())
        return server

    def test_systemd_socket_activate_tcp(self):
        echo_port, time_port = free_port(), free_port()
        server = self.systemd_socket_activate(
            ["127.0.0.1:%d" % echo_port, "127.0.0.1:%d" % time_port],
            "echo:unknown", sys.executable, SCRIPT, "--port-offset",
            str(time_port - 37), "-q")
        # It starts diagsvc on the first connection; that one is served.
        with socket.create_connection(("127.0.0.1", echo_port),
                                      TIMEOUT) as sock:
            sock.sendall(b"activated")
            server.read_start_lines()
            self.assertEqual(recv_exactly(sock, 9), b"activated")
        self.assertEqual(server.addresses, {
            ("echo", "tcp"): [("127.0.0.1", echo_port)],
            ("time", "tcp"): [("127.0.0.1", time_port)]})
        with socket.create_connection(("127.0.0.1", time_port),
                                      TIMEOUT) as sock:
            self.assertEqual(len(recv_to_eof(sock)), 4)
        self.assertEqual(server.stop(), 0)

    def test_systemd_socket_activate_udp(self):
        port = free_port(socket.SOCK_DGRAM)
        server = self.systemd_socket_activate(
            ["127.0.0.1:%d" % port], "daytime", "--datagram",
            sys.executable, SCRIPT, "--for", "30s", "-q")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.sendto(b"first", ("127.0.0.1", port))   # starts diagsvc
            server.read_start_lines()
            self.assertRegex(sock.recv(100), DAYTIME)
        self.assertEqual(server.addresses, {
            ("daytime", "udp"): [("127.0.0.1", port)]})
        self.assertRegex(server.lines[-2], r"after 30 s \(--for\)$")
        self.assertEqual(server.stop(), 0)


class DurationCommandLineTest(unittest.TestCase):

    def test_for_serves_then_exits_0_by_itself(self):
        server = LaunchedServer([sys.executable, SCRIPT, "echo", "--bind",
                                 "127.0.0.1", "--port", "echo=0", "--for",
                                 "1s", "--user", "root", "-q"])
        self.addCleanup(server.kill)
        server.read_start_lines()
        self.assertRegex(server.lines[-2], r"^diagsvc: stops at "
                         r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}, after "
                         r"1 s \(--for\)$")
        self.assertEqual(server.wait(), 0)

    def test_bad_duration_exits_2(self):
        result = run_command("--for", "soon")
        self.assertEqual(result.returncode, 2)
        self.assertIn("'soon' is not a duration: give e.g. 90s, 30m, 2h",
                      result.stderr)


def readme_unit_sets():
    """The unit files in the README, as written there: [{name: text}].
    A file name seen again starts a new set (each set is one way to run it)."""
    with open(os.path.join(HERE, "README.md")) as readme:
        text = readme.read()
    sets = [{}]
    for block in re.findall(r"```ini\n(.*?)```", text, re.S):
        match = re.match(r"# /etc/systemd/system/(\S+)\n", block)
        if not match:
            continue
        if match.group(1) in sets[-1]:
            sets.append({})
        sets[-1][match.group(1)] = block
    return sets


class UnitFileTest(unittest.TestCase):

    def test_readme_units_name_what_the_code_serves(self):
        sets = readme_unit_sets()
        self.assertEqual([sorted(units) for units in sets],
                         [["diagsvc-echo.socket", "diagsvc.service",
                           "diagsvc.socket"], ["diagsvc.service"]])
        activation, plain = sets
        listens = re.findall(r"^Listen(Stream|Datagram)=(\d+)$",
                             activation["diagsvc.socket"], re.M)
        self.assertEqual(sorted(listens), sorted(
            (kind, str(diagsvc.SERVICES[name].port))
            for name in diagsvc.SERVICE_NAMES
            for kind in ("Stream", "Datagram")))
        self.assertEqual(re.findall(r"^FileDescriptorName=(\S+)$",
                                    activation["diagsvc-echo.socket"], re.M),
                         ["echo"])
        for units in sets:
            service = units["diagsvc.service"]
            self.assertIn("\nType=notify\n", service)
            self.assertIn("\nDynamicUser=yes\n", service)
            for line in re.findall(r"^ExecStart=(.*)$", service, re.M):
                self.assertTrue(line.split()[1].endswith("/diagsvc.py"))
                # Every option it gives is one the parser takes.
                diagsvc._build_parser().parse_args(line.split()[2:])
        self.assertIn("AmbientCapabilities=CAP_NET_BIND_SERVICE",
                      plain["diagsvc.service"])

    @unittest.skipUnless(os.path.exists(SYSTEMD_ANALYZE),
                         "no systemd-analyze here")
    def test_systemd_analyze_verify_accepts_the_readme_units(self):
        for units in readme_unit_sets():
            with self.subTest(units=sorted(units)):
                directory = tempfile.mkdtemp()
                self.addCleanup(__import__("shutil").rmtree, directory)
                paths = []
                for name, text in units.items():
                    # ExecStart's interpreter must exist; the script's path
                    # is only an argument to it.
                    paths.append(os.path.join(directory, name))
                    with open(paths[-1], "w") as unit:
                        unit.write(text)
                result = subprocess.run(
                    [SYSTEMD_ANALYZE, "verify", "--man=no"] + paths,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    universal_newlines=True, timeout=60,
                    env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
                self.assertEqual(result.returncode, 0, result.stdout)
                self.assertEqual(result.stdout, "")



class OperatorReviewTest(unittest.TestCase):
    """The outside review of issue 12: pure parts, each answer exact."""

    @unittest.skipIf(sys.platform == "win32", "descriptors of files")
    def test_a_passed_descriptor_that_is_no_socket_says_which(self):
        descriptor = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, descriptor)
        closed = os.dup(descriptor)
        os.close(closed)
        for number, text in ((descriptor, "is not a socket"),
                             (closed, "is not open")):
            with self.subTest(text=text):
                with self.assertRaises(diagsvc.ServerError) as caught:
                    diagsvc._inherited_socket(number)
                self.assertEqual(str(caught.exception),
                                 "descriptor %d was passed as a socket but "
                                 "%s" % (number, text))
        os.fstat(descriptor)            # left open: not ours to close

    def test_a_passed_socket_on_no_port_is_refused(self):
        unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(unbound.close)
        with self.assertRaisesRegex(diagsvc.ServerError,
                                    r"udp on 0\.0\.0\.0 port 0, named 'echo'"
                                    r"\) is not bound to a port"):
            diagsvc._match_sockets([(unbound, "echo")], ["echo"],
                                   ("udp",), 0, {})

    def test_a_port_two_services_could_have_is_refused(self):
        sock = listening()
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]

        def match(name):
            # discard's 9 plus the offset, and echo's --port: the same port.
            return diagsvc._match_sockets(
                [(sock, name)], ["echo", "discard"], ("tcp",), port - 9,
                {"echo": port})
        with self.assertRaisesRegex(diagsvc.ServerError,
                                    "could be discard or echo: name it"):
            match(None)
        self.assertEqual(match("echo"), [(sock, "echo", "tcp")])

    @unittest.skipUnless(hasattr(socket, "AF_UNIX"), "no AF_UNIX here")
    def test_the_watchdog_interval_has_a_floor(self):
        for usec, interval in (("1", 0.1), ("200000", 0.1),
                               ("400000", 0.2)):
            notifier = diagsvc.SystemdNotifier.from_environment(
                {"NOTIFY_SOCKET": "@diagsvc-unused", "WATCHDOG_USEC": usec},
                pid=42)
            self.addCleanup(notifier.close)
            self.assertEqual(notifier.watchdog_interval, interval)

    def test_the_plain_unit_restarts_on_failure(self):
        plain = readme_unit_sets()[1]["diagsvc.service"]
        self.assertIn("\nRestart=on-failure\n", plain)

    def test_compound_durations(self):
        for text, seconds in (("1h30m", 5400), ("2m30s", 150),
                              ("1h0m5s", 3605), ("1.5h", 5400)):
            with self.subTest(text=text):
                self.assertEqual(diagsvc.parse_duration(text), seconds)
        for text in ("30m1h", "1h1h", "1h-5m", "1h 30m", "0h0m", "h30m"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, diagsvc.parse_duration, text)

    def test_duration_text_never_exponent_nor_rounded(self):
        for seconds, text in ((1e9, "1000000000 s"),
                              (123456.7, "123456.7 s"), (1.5, "1.5 s"),
                              (45, "45 s"), (5400, "90 min"), (7200, "2 h")):
            self.assertEqual(diagsvc._duration_text(seconds), text)

# --- Trust, second review: close() on the loop's thread, the log thread, ----
# --- fork, one-shot lingers, select() one-shots, quotes, the reserve ---------


class LoopThreadCloseTest(unittest.TestCase):
    """close() on the loop's own thread (a signal handler) only asks; the
    teardown is serve_forever()'s, and no step of it can leak the rest."""

    @unittest.skipUnless(ON_LINUX, "counts descriptors in /proc")
    def test_close_during_the_sweep_on_the_loop_thread(self):
        before = open_descriptor_count()
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                                transports=["tcp"], idle_timeout=0.2)
        # A bound if close() never fires: from another thread, any version.
        guard = threading.Timer(TIMEOUT, server.close)
        guard.start()
        self.addCleanup(guard.cancel)
        fired = []

        class SignalInTheSweep(set):
            # A signal handler calling close() while the sweep iterates
            # over the streams (as SIGALRM did in the review's script).
            def __iter__(self):
                for number, stream in enumerate(set.__iter__(self)):
                    if number == 0 and not fired:
                        fired.append(True)
                        server.close()
                    yield stream

        server.streams = SignalInTheSweep()
        client = socket.create_connection(server.addresses["echo", "tcp"][0],
                                          TIMEOUT)
        self.addCleanup(client.close)
        server.serve_forever()          # here: the loop's thread is ours
        self.assertTrue(fired)
        self.assertFalse(server.streams)
        self.assertEqual(server.per_source, {})
        client.close()
        server.close()
        guard.cancel()
        guard.join()
        self.assertEqual(open_descriptor_count(), before)

    def test_close_stream_without_its_source_group(self):
        with diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                            transports=["tcp"]) as server:
            server.start()
            sock = socket.create_connection(server.addresses["echo", "tcp"][0],
                                            TIMEOUT)
            self.addCleanup(sock.close)
            sock.sendall(b"x")
            self.assertEqual(sock.recv(1), b"x")
            stream = next(iter(server.streams))
            server.per_source.clear()
            server.close_stream(stream)         # no KeyError
            self.assertEqual(sock.recv(1), b"")

    @unittest.skipUnless(ON_LINUX, "counts descriptors in /proc")
    def test_teardown_with_a_broken_selector_leaks_nothing(self):
        before = open_descriptor_count()
        threads = threading.active_count()
        with self.assertRaises(Exception):
            diagsvc.Server(["chargen", "echo"], bind=["127.0.0.1"],
                           port_offset=None, selector=int)
        self.assertEqual(open_descriptor_count(), before)
        self.assertEqual(threading.active_count(), threads)


class LogThreadTest(unittest.TestCase):
    """The log thread: a start that fails, a Server nobody closes, fork."""

    @unittest.skipUnless(ON_LINUX, "counts descriptors in /proc")
    def test_a_log_thread_that_cannot_start(self):
        def refuse(thread):
            raise RuntimeError("can't start new thread")

        before = open_descriptor_count()
        started = threading.Thread.start
        threading.Thread.start = refuse
        try:
            with self.assertRaises(diagsvc.ServerError) as caught:
                diagsvc.Server(["chargen", "echo"], bind=["127.0.0.1"],
                               port_offset=None)
        finally:
            threading.Thread.start = started
        self.assertEqual(str(caught.exception),
                         "cannot start the log thread: can't start new thread")
        self.assertEqual(open_descriptor_count(), before)

    @unittest.skipUnless(ON_LINUX, "counts descriptors in /proc")
    def test_a_server_never_closed_is_collected(self):
        before = open_descriptor_count()
        threads = threading.active_count()
        server = diagsvc.Server(["chargen", "echo"], bind=["127.0.0.1"],
                                port_offset=None, transports=["tcp"])
        port = server.addresses["echo", "tcp"][0][1]
        del server
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            wait_until(lambda: open_descriptor_count() == before and
                       threading.active_count() == threads,
                       message="the dropped server's thread and sockets")
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))     # the port is free again

    @unittest.skipUnless(hasattr(os, "fork") and ON_LINUX, "os.fork")
    def test_a_forked_child_logs(self):
        reader, writer = os.pipe()
        self.addCleanup(os.close, reader)
        log_file = os.fdopen(writer, "w")
        self.addCleanup(log_file.close)
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                                transports=["tcp"], log_file=log_file)
        self.addCleanup(server.close)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:                    # the child: never back to unittest
            try:
                server.log("child line")
                server.close()          # waits for the line to be written
            finally:
                os._exit(0)
        finished = []
        wait_until(lambda: finished.append(os.waitpid(pid, os.WNOHANG)) or
                   finished[-1][0] == pid, message="the child to exit")
        server.log("parent line")
        server.close()
        log_file.close()
        received = b""
        while True:
            chunk = os.read(reader, 65536)
            if not chunk:
                break
            received += chunk
        self.assertIn(b"diagsvc: child line\n", received)
        self.assertIn(b"diagsvc: parent line\n", received)


class OneShotSecondReviewTest(ServerTestCase):
    """Answered one-shots are never refusals; select() one-shots answer."""

    def test_short_idle_timeout_counts_no_answered_one_shot(self):
        server = self.start_server(["daytime"], transports=["tcp"],
                                   idle_timeout=0.2)
        for _ in range(3):
            sock = self.connect(server, "daytime")
            self.assertRegex(recv_to_eof(sock), DAYTIME)    # held open
        wait_until(lambda: server.counters["daytime", "tcp"].connections == 3,
                   message="three connections")
        wait_until(lambda: not server.streams, message="the lingers to end")
        self.assertEqual(server.counters["daytime", "tcp"].refusals, {})

    allow_descriptors = UnwatchableDescriptorTest.allow_descriptors
    hold_descriptors_up_to = UnwatchableDescriptorTest.hold_descriptors_up_to

    @unittest.skipUnless(ON_LINUX and HAVE_SELECT_SELECTOR,
                         "needs Linux's FD_SETSIZE of 1024 on values")
    def test_select_answers_a_one_shot_it_cannot_watch(self):
        import selectors
        self.allow_descriptors(1300)
        services = ["daytime", "qotd", "time"]
        server = diagsvc.Server(services, bind=["127.0.0.1"], port_offset=None,
                                transports=["tcp"],
                                selector=selectors.SelectSelector)
        self.addCleanup(server.close)
        self.hold_descriptors_up_to(1100)
        clients = []
        for service in services:
            sock = socket.create_connection(server.addresses[service, "tcp"][0],
                                            TIMEOUT)
            self.addCleanup(sock.close)
            # Queued before the loop runs, as nmap and ncat may send: read
            # before the close, so no reset.  (Data sent after the close
            # would get one: these connections do not linger.)
            sock.sendall(b"n" * 100)
            clients.append((service, sock))
        server.start()
        for service, sock in clients:
            with self.subTest(service=service):
                reply = recv_to_eof(sock)
                self.assertEqual(sock.getsockopt(socket.SOL_SOCKET,
                                                 socket.SO_ERROR), 0)
                if service == "daytime":
                    self.assertRegex(reply, DAYTIME)
                elif service == "qotd":
                    self.assertIn(reply, server.quotes)
                else:
                    self.assertEqual(len(reply), 4)
                counters = server.counters[service, "tcp"]
                self.assertEqual(counters.refusals, {})
                self.assertEqual(counters.connections, 1)


class QuotesArgumentTest(unittest.TestCase):
    """quotes= is held to the quote file's rules (RFC 865)."""

    def test_quotes_checked(self):
        for quotes, text in (
                ([b"x" * 600], "quotes: quote 1 is 600 characters; RFC 865 "
                                "wants fewer than 512"),
                ([b"fine\r\n", b"bell\x07\r\n"], "quotes: quote 2 holds byte "
                 "7, which is not printable ASCII, CR or LF (RFC 865)")):
            with self.subTest(text=text):
                with self.assertRaises(diagsvc.QuoteFileError) as caught:
                    diagsvc.Server(["qotd"], bind=["127.0.0.1"],
                                   port_offset=None, quotes=quotes)
                self.assertEqual(str(caught.exception), text)
        with diagsvc.Server(["qotd"], bind=["127.0.0.1"], port_offset=None,
                            quotes=[b"A quote.\r\n"]) as server:
            self.assertEqual(server.quotes, (b"A quote.\r\n",))


class DescriptorReserveTest(unittest.TestCase):
    """Under select(), the default cap is reachable with the default bind's
    24 sockets (and the README gives the same figures)."""

    @unittest.skipUnless(ON_LINUX and HAVE_SELECT_SELECTOR,
                         "needs Linux's FD_SETSIZE of 1024 on values")
    def test_select_cap_fits_below_fd_setsize(self):
        import selectors
        # In a fresh interpreter, as the command line runs: every
        # descriptor below FD_SETSIZE that is open once the default bind's
        # 24 sockets are (stdio, the waker, the log, the ring...), plus
        # the default cap, must fit below FD_SETSIZE.
        code = (
            "import os, selectors, sys; sys.path.insert(0, %r); "
            "import diagsvc; hosts = ['127.0.0.1'] + "
            "(['::1'] if diagsvc._ipv6_available() else []); "
            "s = diagsvc.Server(bind=hosts, port_offset=None, "
            "selector=selectors.SelectSelector); "
            "held = [int(fd) for fd in os.listdir('/proc/self/fd')]; "
            "print(len([fd for fd in held if fd < diagsvc.SELECT_LIMIT]), "
            "s.max_connections); s.close()" % HERE)
        output = subprocess.check_output([sys.executable, "-c", code],
                                         timeout=TIMEOUT)
        held, cap = [int(word) for word in output.split()]
        self.assertLessEqual(held + cap, diagsvc.SELECT_LIMIT)
        with open(os.path.join(HERE, "README.md")) as readme:
            text = readme.read()
        self.assertIn("at most %d (%d on Windows)" % (
            1024 - diagsvc.DESCRIPTOR_RESERVE, 512 - diagsvc.DESCRIPTOR_RESERVE),
            text)


# --- Pinned promises: each test fails on one plausible bug (issue 9) --------
#
# .ci/mutate.py makes those bugs one at a time and runs this file on each.


def random_at_most(limit):
    """Stands in for diagsvc._random_below: always its largest value."""
    return limit - 1


class local_time_zone(object):
    """TZ set for a block (time.tzset() where it exists), then restored."""

    def __init__(self, zone):
        self.zone = zone

    def __enter__(self):
        if not hasattr(time, "tzset"):
            raise unittest.SkipTest("no time.tzset() here")
        self.saved = os.environ.get("TZ")
        os.environ["TZ"] = self.zone
        time.tzset()

    def __exit__(self, *exc_info):
        if self.saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = self.saved
        time.tzset()


class ChargenPromiseTest(ServerTestCase):

    def test_udp_replies_walk_the_ring_and_reach_512(self):
        from unittest import mock
        server = self.start_server(["chargen"], udp_rate=0)
        sock = self.udp_socket()
        address = server.addresses["chargen", "udp"][0]
        ring = expected_chargen(95 * 2 + 7)
        with mock.patch.object(diagsvc, "_random_below", random_at_most):
            # 97 replies: the ring's 95 lines, then round again.
            for number in range(97):
                sock.sendto(b"", address)
                reply = sock.recv(2048)
                start = (number % 95) * 74
                self.assertEqual(len(reply), 512)
                self.assertEqual(reply, ring[start:start + 512], number)

    def test_probe_judges_a_512_byte_reply_open(self):
        ring = expected_chargen(8)
        self.assertEqual(diagsvc._judge("chargen", "udp", ring[:512], b"",
                                        True),
                         ("open", "512 characters of the ring"))
        self.assertEqual(diagsvc._judge("chargen", "udp", ring[:513], b"",
                                        True)[0], "wrong")

    def test_tcp_stream_is_exact_after_the_buffer_wraps(self):
        # The precomputed buffer is ~274 KB: 600 KB wraps it twice, on
        # both send paths.
        size = 600 * 1000
        expected = expected_chargen(size // 74 + 1)[:size]
        for path in ("sendfile", "send"):
            with self.subTest(path=path):
                server = self.start_server(["chargen"])
                if path == "send":
                    server.chargen_ring_file = None
                received = recv_exactly(self.connect(server, "chargen"), size)
                self.assertEqual(len(received), size)
                if received != expected:
                    self.fail("first difference at byte %d" % next(
                        i for i in range(size) if received[i] != expected[i]))

    @unittest.skipUnless(ON_LINUX and hasattr(os, "sendfile"),
                         "sendfile() from /dev/null is EINVAL on Linux")
    def test_a_ring_file_sendfile_refuses_falls_back_to_send(self):
        server = self.start_server(["chargen"])
        # sendfile() from /dev/null fails with EINVAL (Linux), as it does
        # where the socket type or file system cannot do it.
        refusing = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, refusing)
        server.chargen_ring_file = refusing
        sock = self.connect(server, "chargen")
        self.assertEqual(recv_exactly(sock, 100 * 74), expected_chargen(100))
        self.assertIsNone(server.chargen_ring_file)

    def test_udp_chargen_is_rate_limited(self):
        server = self.start_server(["chargen", "echo"], udp_rate=1.0,
                                   udp_burst=2)
        sock = self.udp_socket()
        address = server.addresses["chargen", "udp"][0]
        for _ in range(3):
            sock.sendto(b"", address)
        wait_until(lambda: server.counters["chargen", "udp"].datagrams == 3,
                   message="three chargen datagrams")
        self.assertEqual(server.counters["chargen", "udp"].refusals,
                         {"rate-limit": 1})

    def test_tcp_keeps_streaming_after_the_client_half_closes(self):
        server = self.start_server(["chargen"])
        port = server.addresses["chargen", "tcp"][0][1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        # A small receive buffer: what the server sent before it saw the
        # half-close is at most its own send buffer (4 MiB here) and this.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: any(stream.events == diagsvc.EVENT_WRITE
                               for stream in list(server.streams)),
                   message="chargen to see the half-close and stop reading")
        size = 8 << 20
        period = expected_chargen(95)
        expected = (period * (size // len(period) + 1))[:size]
        received = recv_exactly(sock, size)
        self.assertEqual(len(received), size)
        self.assertTrue(received == expected)
        self.assertEqual(len(server.streams), 1)


class EchoPromiseTest(ServerTestCase):

    def test_echo_is_exact_through_a_stall(self):
        # The client reads nothing until echo has stopped reading (what it
        # owes did not fit): then the owed bytes go out in pieces, in order.
        server = self.start_server(["echo"], max_output=256 * 1024)
        port = server.addresses["echo", "tcp"][0][1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
        # A small send buffer on the server's side, so that the kernel
        # takes what is owed a piece at a time (send_owed's partial sends).
        wait_until(lambda: server.streams, message="the connection")
        (stream,) = list(server.streams)
        stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = os.urandom(2 << 20)
        sender = threading.Thread(target=lambda: (
            sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.daemon = True
        sender.start()
        wait_until(lambda: any(stream.owed is not None
                               for stream in list(server.streams)),
                   message="echo to owe bytes")
        received = recv_to_eof(sock)
        sender.join(TIMEOUT)
        self.assertEqual(len(received), len(payload))
        self.assertTrue(received == payload)

    def test_stats_keep_bytes_in_and_out_apart(self):
        server = self.start_server(["discard"])
        sock = self.connect(server, "discard")
        sock.sendall(b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_to_eof(sock), b"")
        wait_until(lambda: not server.streams, message="discard to close")
        self.assertEqual(server.stats()["discard", "tcp"], {
            "connections": 1, "datagrams": 0, "bytes_in": 1000,
            "bytes_out": 0, "refusals": {}})


class DaytimePromiseTest(unittest.TestCase):

    def test_weekday_and_space_padded_day_in_utc(self):
        with local_time_zone("UTC"):
            self.assertEqual(diagsvc.daytime_text(1232412198),
                             b"Tue Jan 20 00:43:18 2009\r\n")
            self.assertEqual(diagsvc.daytime_text(1231139289),
                             b"Mon Jan  5 07:08:09 2009\r\n")
            self.assertEqual(diagsvc.daytime_text(1230768000 - 1),
                             b"Wed Dec 31 23:59:59 2008\r\n")


class QotdPromiseTest(ServerTestCase):

    def test_511_bytes_accepted_512_refused(self):
        # The length RFC 865 limits is the quote as sent, CRLF included.
        quote = "q" * 509
        self.assertEqual(diagsvc.parse_quotes(quote),
                         ((quote + "\r\n").encode("ascii"),))
        with self.assertRaisesRegex(diagsvc.QuoteFileError,
                                    "lines 1-1 is 512 characters"):
            diagsvc.parse_quotes(quote + "q")

    def test_del_and_other_controls_are_refused(self):
        # README: a quote file that is not printable ASCII is refused, also
        # where str.splitlines() sees a line end or str.strip() a space.
        for character in ("\x7f", "\x1f", "\x00", "\x80", "\x0c", "\x0b",
                          "\x1c", "\x1e", "\x85"):
            for text in ("fine\nnot " + character + " here\n",
                         "fine\nnot " + character + "\n",
                         "fine\n" + character + "%\n"):
                with self.subTest(character=character, text=text):
                    with self.assertRaisesRegex(diagsvc.QuoteFileError,
                                                "line 2 holds"):
                        diagsvc.parse_quotes(text)
        with self.assertRaisesRegex(diagsvc.QuoteFileError, "line 1 holds"):
            diagsvc.parse_quotes("a lone \r is no line end\n")
        # CRLF files and fortune's "%" lines with trailing blanks still work.
        self.assertEqual(diagsvc.parse_quotes("one\r\ntwo \t\r\n% \r\n3\r\n"),
                         (b"one\r\ntwo\r\n", b"3\r\n"))
        for character in (" ", "~"):            # the ends of the range
            self.assertEqual(diagsvc.parse_quotes("a" + character + "b"),
                             (("a" + character + "b\r\n").encode("ascii"),))

    def test_a_quote_of_blank_lines_is_no_quote(self):
        self.assertEqual(diagsvc.parse_quotes("a\n%\n\n  \n%\nb\n"),
                         (b"a\r\n", b"b\r\n"))

    def test_every_quote_can_be_chosen(self):
        from unittest import mock
        quotes = (b"first\r\n", b"second\r\n", b"third\r\n")
        server = self.start_server(["qotd"], quotes=quotes, udp_rate=0)
        with mock.patch.object(diagsvc, "_random_below", random_at_most):
            self.assertEqual(recv_to_eof(self.connect(server, "qotd")),
                             b"third\r\n")
            self.assertEqual(self.udp_exchange(server, "qotd", b""),
                             b"third\r\n")
        with mock.patch.object(diagsvc, "_random_below", lambda limit: 0):
            self.assertEqual(recv_to_eof(self.connect(server, "qotd")),
                             b"first\r\n")

    def test_a_one_shot_reply_ends_with_its_half_close_not_the_linger(self):
        from unittest import mock
        patch = mock.patch.object(diagsvc, "ONE_SHOT_LINGER", 3600.0)
        patch.start()
        self.addCleanup(patch.stop)
        server = self.start_server(["daytime", "qotd", "time"])
        for service in ("daytime", "qotd", "time"):
            sock = self.connect(server, service)
            self.assertTrue(recv_to_eof(sock))  # EOF now, not in an hour
            sock.close()
        wait_until(lambda: not server.streams, message="the one-shots to end")

    def test_the_linger_does_not_cut_a_reply_still_owed(self):
        # Driven by hand: a reply the client has not read yet is the idle
        # timeout's business, not the linger's (which starts at the FIN).
        quote = os.urandom(16 << 20)
        server = diagsvc.Server(["qotd"], bind=["127.0.0.1"],
                                transports=["tcp"], port_offset=None)
        self.addCleanup(server.close)
        # Past the constructor's RFC 865 check: only the send path is tested.
        server.quotes = (quote,)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.connect(server.addresses["qotd", "tcp"][0])
        server.listeners[0].on_event(diagsvc.EVENT_READ)
        (stream,) = server.streams
        self.assertIsNotNone(stream.owed)
        server.now += diagsvc.ONE_SHOT_LINGER + 1.0
        server._next_sweep = server.now
        server._run_timers()
        self.assertEqual(server.streams, {stream})

    def test_a_reply_the_socket_cannot_take_at_once_is_finished(self):
        # A reply that outgrows the
        # socket buffers, so the rest goes through the loop (owed), and
        # the half-close follows the last byte, not the linger's end.
        from unittest import mock
        patch = mock.patch.object(diagsvc, "ONE_SHOT_LINGER", 3600.0)
        patch.start()
        self.addCleanup(patch.stop)
        # 16 MiB is past any send buffer Linux gives (tcp_wmem's 4 MiB).
        quote = os.urandom(16 << 20)
        server = self.start_server(["qotd"])
        # Past the constructor's RFC 865 check: only the send path is tested.
        server.quotes = (quote,)
        port = server.addresses["qotd", "tcp"][0][1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
        received = recv_to_eof(sock)
        self.assertEqual(len(received), len(quote))
        self.assertTrue(received == quote)
        sock.close()                            # the server waits for this
        wait_until(lambda: not server.streams, message="the reply to end")
        self.assertEqual(server.counters["qotd", "tcp"].bytes_out, len(quote))

    def test_random_below_covers_its_range(self):
        drawn = set(diagsvc._random_below(3) for _ in range(300))
        self.assertEqual(drawn, {0, 1, 2})


class IdlePromiseTest(ServerTestCase):

    def test_busy_discard_and_chargen_outlive_the_idle_timeout(self):
        # Timeout 0.3 s, 0.75 s of traffic (small on purpose: the suite's
        # time; the ratios are those of 0.6 s and 1.5 s): a client paced at
        # 0.05 s is never quiet for 0.3 s, even on a loaded machine; a bug
        # closes within 0.375 s (timeout + a quarter), well inside 0.75 s.
        server = self.start_server(["discard", "chargen"], idle_timeout=0.3)
        sender = self.connect(server, "discard")
        reader = self.connect(server, "chargen")
        stop = threading.Event()

        def keep_sending():
            while not stop.is_set():
                sender.sendall(b"d" * 100)
                stop.wait(0.05)         # a live client's pace, not a sync
        thread = threading.Thread(target=keep_sending)
        thread.start()
        try:
            started = time.monotonic()
            received = 0
            while time.monotonic() - started < 0.75:
                chunk = reader.recv(65536)
                self.assertTrue(chunk, "chargen closed after %d bytes" %
                                received)
                received += len(chunk)
        finally:
            stop.set()
            thread.join()
        self.assertEqual(len(server.streams), 2)
        self.assertEqual(server.counters["discard", "tcp"].refusals, {})
        self.assertEqual(server.counters["chargen", "tcp"].refusals, {})
        sender.sendall(b"still open")
        self.assertTrue(reader.recv(100))

    def test_idle_timeout_zero_never_closes(self):
        # Driven by hand: the clock jumps a day and the sweep runs.
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                transports=["tcp"], port_offset=None,
                                idle_timeout=0)
        self.addCleanup(server.close)
        client = socket.create_connection(server.addresses["echo", "tcp"][0],
                                          TIMEOUT)
        self.addCleanup(client.close)
        server.listeners[0].on_event(diagsvc.EVENT_READ)
        (stream,) = server.streams
        server.now += 86400.0
        server._run_timers()
        self.assertEqual(server.streams, {stream})
        self.assertEqual(server.counters["echo", "tcp"].refusals, {})
        self.assertEqual(server._sweep_interval(), diagsvc.MAX_TIMER_WAIT)

    def test_sweep_closes_only_what_was_idle_longer_than_the_timeout(self):
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                transports=["tcp"], port_offset=None,
                                idle_timeout=10.0)
        self.addCleanup(server.close)
        clients = []
        for _ in range(2):
            clients.append(socket.create_connection(
                server.addresses["echo", "tcp"][0], TIMEOUT))
            self.addCleanup(clients[-1].close)
        server.listeners[0].on_event(diagsvc.EVENT_READ)
        old, fresh = sorted(server.streams, key=id)
        self.assertEqual(server._sweep_interval(), 1.0)
        server.now += 10.5
        fresh.last_active = server.now - 9.5
        server._run_timers()
        self.assertEqual(server.streams, {fresh})
        self.assertEqual(server.counters["echo", "tcp"].refusals,
                         {"idle-timeout": 1})
        self.assertEqual(server._next_sweep, server.now + 1.0)
        # A short timeout is swept four times within it.
        server.idle_timeout = 0.4
        self.assertAlmostEqual(server._sweep_interval(), 0.1)
        server.idle_timeout = 0.01
        self.assertEqual(server._sweep_interval(), 0.05)


class RateLimitPromiseTest(unittest.TestCase):
    """The token bucket, driven by hand with exact binary clock steps."""

    def make_server(self, **options):
        server = diagsvc.Server(["daytime"], bind=["127.0.0.1"],
                                transports=["udp"], port_offset=None,
                                **options)
        self.addCleanup(server.close)
        server.now = 1000.0
        return server

    def drain(self, server, source, allowed):
        for number in range(allowed):
            self.assertIsNone(server.rate_limited(source), number)
        self.assertEqual(server.rate_limited(source), "rate-limit")

    def test_bucket_refills_at_the_rate_and_only_up_to_the_burst(self):
        server = self.make_server(udp_rate=4.0, udp_burst=3)
        self.drain(server, "192.0.2.1", 3)
        server.now += 0.25                      # one token at 4 a second
        self.drain(server, "192.0.2.1", 1)
        server.now += 0.125                     # half a token: not yet
        self.assertEqual(server.rate_limited("192.0.2.1"), "rate-limit")
        server.now += 0.125
        self.drain(server, "192.0.2.1", 1)
        server.now += 3600.0                    # an idle hour: the burst
        self.drain(server, "192.0.2.1", 3)
        self.drain(server, "192.0.2.2", 3)      # each source its own

    def test_limited_source_stays_limited_across_the_sweep(self):
        server = self.make_server(udp_rate=4.0, udp_burst=3)
        self.drain(server, "192.0.2.1", 3)
        self.assertIsNone(server.rate_limited("192.0.2.2"))
        server.now += 0.125
        server._next_sweep = server.now
        server._run_timers()
        self.assertEqual(server.rate_limited("192.0.2.1"), "rate-limit")
        # A bucket that is full again is forgotten by the sweep.
        server.now += 10.0
        server._next_sweep = server.now
        server._run_timers()
        self.assertEqual(server._rate_buckets, {})

    def test_a_full_table_refuses_new_sources_until_it_can_prune(self):
        from unittest import mock
        server = self.make_server(udp_rate=4.0, udp_burst=2)
        with mock.patch.object(diagsvc, "RATE_TABLE_MAX", 2):
            self.drain(server, "192.0.2.1", 2)
            self.drain(server, "192.0.2.2", 2)
            self.assertEqual(server.rate_limited("192.0.2.3"),
                             "rate-table-full")
            server.now += 0.5                   # 192.0.2.1 and .2 refill
            self.assertIsNone(server.rate_limited("192.0.2.3"))
            self.assertEqual(sorted(server._rate_buckets), ["192.0.2.3"])

    def test_rate_zero_and_echo_are_not_limited(self):
        server = self.make_server(udp_rate=0, udp_burst=0)
        self.assertEqual(server.udp_burst, 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        server.start()
        for _ in range(60):
            sock.sendto(b"", server.addresses["daytime", "udp"][0])
            self.assertTrue(DAYTIME.match(sock.recv(100)))


class GroupAddressPromiseTest(unittest.TestCase):

    def test_the_edges_of_the_multicast_range(self):
        self.assertTrue(diagsvc._is_group_destination(b"\xe0\0\0\1"))
        self.assertFalse(diagsvc._is_group_destination(b"\xdf\xff\xff\xff"))
        self.assertTrue(diagsvc._is_group_address("224.0.0.1"))
        self.assertFalse(diagsvc._is_group_address("223.255.255.255"))
        self.assertFalse(diagsvc._is_group_destination(b"\xfe\x80" +
                                                       b"\0" * 14))


    def test_which_ipv6_addresses_need_their_interface(self):
        # A reply from link-local or multicast needs the interface pinned;
        # any other address is routed as the kernel would route it.
        def needs(text):
            return diagsvc._needs_interface(socket.inet_pton(
                socket.AF_INET6, text))
        for text in ("fe80::1", "febf::1", "ff02::1"):
            self.assertTrue(needs(text), text)
        for text in ("fec0::1", "fd00::2", "::1", "2001:db8::1"):
            self.assertFalse(needs(text), text)


@needs_linux
class GroupDestinationTest(ServerTestCase):
    """Datagrams sent to a group address, on a wildcard socket."""

    def test_broadcast_and_multicast_destinations_are_refused(self):
        server = self.start_server(["echo"], host="0.0.0.0",
                                   transports=["udp"])
        port = server.addresses["echo", "udp"][0][1]
        counters = server.counters["echo", "udp"]
        sock = self.udp_socket(timeout=0.0)
        # (udp_socket() bound it to 127.0.0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # 127.255.255.255: loopback's directed broadcast (on Linux's lo).
        sock.sendto(b"to all", ("127.255.255.255", port))
        wait_until(lambda: counters.datagrams == 1, message="the broadcast")
        expected = {"group-destination": 1}
        try:
            server.endpoints[0].sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                socket.inet_aton("224.0.0.1") + socket.inet_aton("127.0.0.1"))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            socket.inet_aton("127.0.0.1"))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        except OSError:
            pass                        # no multicast on loopback here
        else:
            sock.sendto(b"to the group", ("224.0.0.1", port))
            wait_until(lambda: counters.datagrams == 2,
                       message="the multicast datagram")
            expected = {"group-destination": 2}
        self.assertEqual(counters.refusals, expected)
        self.assertEqual(counters.bytes_out, 0)
        # Unicast on the same socket is answered, from where it was sent.
        sock.settimeout(TIMEOUT)
        sock.sendto(b"to one", ("127.0.0.1", port))
        self.assertEqual(sock.recvfrom(100), (b"to one", ("127.0.0.1", port)))

    def test_group_sources_are_refused_by_the_guard_only(self):
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                transports=["udp"], port_offset=None)
        self.addCleanup(server.close)
        for source in ("224.0.0.1", "255.255.255.255", "ff02::1"):
            self.assertEqual(server.udp_source_refusal(source),
                             "group-source")
        self.assertIsNone(server.udp_source_refusal("127.0.0.1"))
        server.udp_guard = False
        self.assertIsNone(server.udp_source_refusal("224.0.0.1"))

    def test_without_the_guard_a_broadcast_is_answered_from_a_unicast_address(self):
        server = self.start_server(["echo"], host="0.0.0.0",
                                   transports=["udp"], udp_guard=False)
        port = server.addresses["echo", "udp"][0][1]
        sock = self.udp_socket()
        # (udp_socket() bound it to 127.0.0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.sendto(b"lab", ("127.255.255.255", port))
        self.assertEqual(sock.recvfrom(100), (b"lab", ("127.0.0.1", port)))


NAMESPACE_ECHO_CHECK = r"""
import socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
import diagsvc
subprocess.check_call(["ip", "link", "set", "lo", "up"])
subprocess.check_call(["ip", "-6", "addr", "add", "fd00:9::2/128", "dev",
                       "lo", "nodad"])
with diagsvc.Server(["echo"], bind=["::"], transports=["udp"],
                    port_offset=None) as server:
    server.start()
    port = server.addresses["echo", "udp"][0][1]
    for source, destination in (("::1", "fd00:9::2"), ("fd00:9::2", "::1"),
                                ("::1", "::1")):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.settimeout(0.5)
        sock.bind((source, 0))
        # The kernel finishes a new address's setup in a work queue: on a
        # loaded machine the first datagrams may find no route yet.  Ask
        # again, as a UDP client does, for up to 10 s.
        for attempt in range(20):
            sock.sendto(b"via " + destination.encode(), (destination, port))
            try:
                reply, sender = sock.recvfrom(100)
                break
            except socket.timeout:
                continue
        print(reply.decode(), sender[0])
        sock.close()
"""


class LoopWatchPromiseTest(unittest.TestCase):
    """The loop watch driven by hand: one echo endpoint, no loop thread.

    Loopback UDP is queued in the receiver during sendto(), so each
    exchange below is: send, one on_event(), read what came back.  The
    clock only moves forward from where the constructor set it.
    """

    def setUp(self):
        self.server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                     transports=["udp"], port_offset=None)
        self.addCleanup(self.server.close)
        self.endpoint = self.server.endpoints[0]
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.client.close)
        self.client.bind(("127.0.0.1", 0))
        self.client.setblocking(False)
        self.peer = self.client.getsockname()

    def exchange(self, payload):
        """The reply, or None when the datagram was refused."""
        self.client.sendto(payload, self.endpoint.address)
        self.assertTrue(select.select([self.endpoint.sock], [], [],
                                      TIMEOUT)[0])
        self.endpoint.on_event(diagsvc.EVENT_READ)
        try:
            return self.client.recv(100)
        except BlockingIOError:
            return None

    def refusals(self):
        return self.server.counters["echo", "udp"].refusals

    def test_returns_past_the_allowance_are_refused_new_bytes_are_not(self):
        for number in range(1 + diagsvc.LOOP_RETURNS):
            self.assertEqual(self.exchange(b"same"), b"same", number)
        self.assertIsNone(self.exchange(b"same"))
        self.assertEqual(self.refusals(), {"loop-detected": 1})
        self.assertEqual(self.exchange(b"fresh"), b"fresh")
        # One return is forgiven each LOOP_RETURN_INTERVAL.
        self.server.now += diagsvc.LOOP_RETURN_INTERVAL
        self.server._age_loop_watch()
        self.assertEqual(self.server.loop_suspects,
                         {self.peer: diagsvc.LOOP_RETURNS - 1})
        self.assertEqual(self.exchange(b"same"), b"same")
        self.assertIsNone(self.exchange(b"same"))

    def test_replies_are_remembered_for_two_generations_then_forgotten(self):
        self.assertEqual(self.exchange(b"A"), b"A")
        self.server.forget_old_replies()        # a new generation
        self.assertEqual(self.exchange(b"A"), b"A")
        self.assertEqual(self.server.loop_suspects, {self.peer: 1})
        self.server.forget_old_replies()
        self.server.forget_old_replies()        # two generations on: gone
        self.assertEqual(self.exchange(b"A"), b"A")
        self.assertEqual(self.server.loop_suspects, {self.peer: 1})
        # The sweep starts a generation each LOOP_MEMORY seconds.
        self.server.now += diagsvc.LOOP_MEMORY
        self.server._age_loop_watch()
        self.assertEqual(self.server.replied, set())


class LogPromiseTest(unittest.TestCase):

    def make_server(self, log_file):
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                transports=["udp"], port_offset=None,
                                log_file=log_file, verbosity=1)
        self.addCleanup(server.close)
        return server

    def test_refusals_are_logged_once_per_source_group(self):
        log_file = io.StringIO()
        server = self.make_server(log_file)
        counters = server.counters["echo", "udp"]
        for host in ("2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"):
            server.refuse(counters, "denied", host, "udp",
                          diagsvc.SERVICES["echo"])
        server.close()                          # writes the queue out
        self.assertEqual(counters.refusals, {"denied": 3})
        lines = [line for line in log_file.getvalue().splitlines()
                 if "refused" in line]
        self.assertEqual(len(lines), 2, lines)    # one for each /64
        self.assertIn("from 2001:db8::1: denied", lines[0])
        self.assertIn("from 2001:db8:0:1::1: denied", lines[1])

    def test_a_stalled_log_queues_a_bounded_number_of_lines(self):
        from unittest import mock
        writing = threading.Event()
        release = threading.Event()

        class StalledLog(io.StringIO):
            def write(self, text):
                writing.set()
                release.wait(TIMEOUT)
                return io.StringIO.write(self, text)
        server = self.make_server(StalledLog())
        self.addCleanup(release.set)
        with mock.patch.object(diagsvc, "LOG_QUEUE_MAX", 3):
            server.log("first")                 # the writer takes it, stalls
            self.assertTrue(writing.wait(TIMEOUT))
            dropped = server.log_lines_dropped
            for number in range(5):
                server.log("queued %d" % number)
            self.assertEqual(server.log_lines_dropped - dropped, 2)
        release.set()


class IPv6ReplySourceTest(unittest.TestCase):

    @unittest.skipUnless(HAVE_IPV6, "no IPv6")
    def test_reply_leaves_from_the_address_it_was_sent_to(self):
        if not (ON_LINUX and hasattr(os, "geteuid") and os.geteuid() == 0):
            self.skipTest("needs root to make a network namespace")
        import shutil
        if not (shutil.which("unshare") and shutil.which("ip")):
            self.skipTest("needs unshare and ip")
        result = subprocess.run(
            ["unshare", "-n", sys.executable, "-c", NAMESPACE_ECHO_CHECK, HERE],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60)
        if result.returncode and "unshare failed" in result.stderr:
            self.skipTest(result.stderr.strip())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines(), [
            "via fd00:9::2 fd00:9::2", "via ::1 ::1", "via ::1 ::1"])


needs_root_on_linux = unittest.skipUnless(
    ON_LINUX and hasattr(os, "geteuid") and os.geteuid() == 0,
    "needs root and /proc")


class PrivilegePromiseTest(unittest.TestCase):

    @needs_root_on_linux
    def test_supplementary_groups_are_gone_after_the_drop(self):
        process = subprocess.Popen(
            [sys.executable, SCRIPT, "echo", "--tcp", "--bind", "127.0.0.1",
             "--port", "echo=0", "-q"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True,
            preexec_fn=lambda: os.setgroups([4, 27, 100]))
        self.addCleanup(process.wait)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.kill)
        for line in process.stdout:
            if line.startswith("diagsvc: running as"):
                break
        with open("/proc/%d/status" % process.pid) as status:
            fields = dict(line.split(":", 1) for line in status)
        self.assertEqual(fields["Groups"].split(), [])
        self.assertEqual(fields["Uid"].split()[0],
                         str(__import__("pwd").getpwnam("nobody").pw_uid))

    @needs_root_on_linux
    def test_a_failed_drop_exits_2_with_one_line(self):
        result = run_command("echo", "--tcp", "--bind", "127.0.0.1",
                             "--port", "echo=0", "--user",
                             "no-such-user-diagsvc")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, (
            "diagsvc: error: no user 'no-such-user-diagsvc' on this host to "
            "drop privileges to; name one with --user NAME (or --user root "
            "to keep root)\n"))

    @unittest.skipUnless(hasattr(os, "geteuid"), "Unix only")
    def test_not_root_or_root_kept_changes_nothing(self):
        import pwd
        if os.geteuid() == 0:
            # --user root changes nothing, supplementary groups included.
            saved = os.getgroups()
            os.setgroups(sorted(set(saved) | {4}))
            try:
                groups = os.getgroups()
                self.assertEqual(diagsvc.drop_privileges("root"),
                                 "user root (uid 0)")
                self.assertEqual(os.getgroups(), groups)
            finally:
                os.setgroups(saved)
        else:
            name = pwd.getpwuid(os.geteuid()).pw_name
            self.assertEqual(diagsvc.drop_privileges("nobody"),
                             "user %s (uid %d)" % (name, os.geteuid()))


class LifecyclePromiseTest(unittest.TestCase):

    def test_shutdown_stops_an_idle_loop_promptly(self):
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                port_offset=None)
        self.addCleanup(server.close)
        # No timer for an hour and nothing to serve: only the waker can end
        # the select().  Wrapped to know that the loop is inside it.
        server._next_timer = time.monotonic() + 3600
        real_select = server.selector.select
        waiting = threading.Event()

        def select(timeout=None):
            waiting.set()
            return real_select(timeout)
        server.selector.select = select
        loop = threading.Thread(target=server.serve_forever)
        loop.daemon = True
        loop.start()
        # If the waker is broken, free the loop so that close() can return.
        self.addCleanup(lambda: server._waker.writer.send(b"\0")
                        if loop.is_alive() else None)
        self.assertTrue(waiting.wait(TIMEOUT))
        server.shutdown()
        loop.join(TIMEOUT)
        self.assertFalse(loop.is_alive(), "the idle loop did not stop")

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc")
    def test_close_releases_every_descriptor_the_ring_included(self):
        def descriptors():
            return len(os.listdir("/proc/self/fd"))
        before = descriptors()
        server = diagsvc.Server(["chargen"], bind=["127.0.0.1"],
                                port_offset=None)
        if hasattr(os, "sendfile"):
            self.assertIsNotNone(server.chargen_ring_file)
        server.start()
        client = socket.create_connection(server.addresses["chargen", "tcp"][0],
                                          TIMEOUT)
        recv_exactly(client, 74)
        server.close()
        client.close()
        self.assertEqual(descriptors(), before)
        server.close()                          # twice: still fine

    def test_any_free_port_tries_again_where_another_program_holds_it(self):
        # Port 0: TCP gets a free port, and UDP must take the same one.
        # Another program may hold it for UDP (the suite runs next to
        # others): that is no error while other ports are free.
        from unittest import mock
        real_bind = diagsvc.Server._bind
        holders = []

        def bind(server, name, transport, family, host, port, scope=0):
            if transport == "udp" and port and not holders:
                holder = socket.socket(family, socket.SOCK_DGRAM)
                holder.bind((host, port))       # taken, as by another program
                holders.append(holder)
            return real_bind(server, name, transport, family, host, port,
                             scope)
        with mock.patch.object(diagsvc.Server, "_bind", bind):
            server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                    port_offset=None)
        self.addCleanup(server.close)
        self.addCleanup(holders[0].close)
        taken = holders[0].getsockname()[1]
        (tcp,), (udp,) = (server.addresses["echo", "tcp"],
                          server.addresses["echo", "udp"])
        self.assertEqual(tcp[1], udp[1])
        self.assertNotEqual(udp[1], taken)
        # A port that was asked for is not changed: that is an error.
        with self.assertRaisesRegex(diagsvc.ServerError, "in use"):
            diagsvc.Server(["echo"], bind=["127.0.0.1"], transports=["udp"],
                           ports={"echo": taken})

    def test_a_failed_constructor_closes_what_it_opened(self):
        with diagsvc.Server(["echo"], bind=["127.0.0.1"], transports=["tcp"],
                            port_offset=None) as first:
            port = first.addresses["echo", "tcp"][0][1]
            if os.path.isdir("/proc/self/fd"):
                before = len(os.listdir("/proc/self/fd"))
            with self.assertRaises(diagsvc.ServerError):
                diagsvc.Server(["chargen", "echo"], bind=["127.0.0.1"],
                               transports=["tcp"], ports={"echo": port},
                               port_offset=None)
            if os.path.isdir("/proc/self/fd"):
                self.assertEqual(len(os.listdir("/proc/self/fd")), before)


class CommandLinePromiseTest(unittest.TestCase):

    @unittest.skipIf(sys.platform == "win32", "signals")
    def test_default_verbosity_logs_counters_on_sigterm(self):
        server = ServerProcess("echo", "--udp", "--bind", "127.0.0.1",
                               "--port", "echo=0")
        self.addCleanup(server.kill)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.sendto(b"12345", server.addresses["echo", "udp"][0])
        self.assertEqual(sock.recv(100), b"12345")
        server.process.terminate()
        _, stderr = server.process.communicate(timeout=TIMEOUT)
        self.assertEqual(server.process.returncode, 0)
        self.assertRegex(stderr, r"(?m) diagsvc: echo/udp: 1 datagrams, 5 "
                                 r"bytes in, 5 bytes out$")

    @unittest.skipIf(sys.platform == "win32", "signals")
    def test_quiet_logs_nothing_on_sigterm(self):
        server = ServerProcess("echo", "--udp", "--bind", "127.0.0.1",
                               "--port", "echo=0", "-q")
        self.addCleanup(server.kill)
        server.process.terminate()
        _, stderr = server.process.communicate(timeout=TIMEOUT)
        self.assertEqual(server.process.returncode, 0)
        self.assertEqual(stderr, "")


# Keys every row has today; new keys may be added (a subset, not equality).
MEASURE_KEYS = {
    "latency": {"test", "transport", "unit", "value", "count", "address",
                "port", "min_us", "p50_us", "p90_us", "p99_us", "max_us"},
    "download": {"test", "transport", "unit", "value", "bytes", "seconds",
                 "parallel", "wrong_bytes", "address", "port"},
    "upload": {"test", "transport", "unit", "value", "bytes", "seconds",
               "parallel", "drained", "address", "port"},
    "echo": {"test", "transport", "unit", "value", "bytes", "seconds",
             "wrong_bytes", "missing_bytes", "address", "port"},
    "connect": {"test", "transport", "unit", "value", "count", "parallel",
                "errors", "error_kinds", "service", "address", "port"},
}
PROBE_KEYS = {"service", "transport", "address", "port", "verdict", "rtt_ms",
              "detail"}


class ClientPromiseTest(ServerTestCase):

    def port_options(self, server):
        return ["--port=%s=%d" % item
                for item in sorted(ports_of(server).items())]

    def test_judging_lengths_and_clock_details(self):
        judge = diagsvc._judge
        self.assertEqual(judge("qotd", "tcp", b"q" * 511, b"", True)[0],
                         "open")
        self.assertEqual(judge("qotd", "udp", b"q" * 512, b"", True), (
            "wrong", "quote of 512 characters; RFC 865 wants under 512"))
        self.assertEqual(judge("echo", "tcp", b"ab", b"abcd", True),
                         ("wrong", "sent 4 bytes, 2 came back"))
        self.assertEqual(judge("discard", "tcp", b"x", b"abcd", True),
                         ("wrong", "discard sent 1 bytes back"))
        self.assertEqual(judge("time", "udp", b"abcde", b"", True),
                         ("wrong", "5 bytes; RFC 868 sends 4"))
        now = time.time()
        self.assertEqual(diagsvc._clock_offset(now + 0.5),
                         "matches the local clock to the second")
        self.assertEqual(diagsvc._clock_offset(now + 5.2), "+5 s from the "
                         "local clock")
        self.assertEqual(diagsvc._clock_offset(now - 3600.2), "-3600 s from "
                         "the local clock")
        self.assertRegex(diagsvc._daytime_detail(diagsvc.daytime_text(now)),
                         r"\(matches the local clock to the second\)$")
        # RFC 868's era: a value that wrapped in 2036 is read as 2036.
        if now < 2085978496 - 86400 * 365:          # until 2035
            self.assertRegex(diagsvc._time_detail(b"\0\0\0\5"),
                             r"^2036-02-07T06:28:21Z \(\+\d+ s from")

    def test_udp_probe_sends_three_times_within_its_timeout(self):
        # Driven by hand with a made-up clock: no waiting.
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))      # takes datagrams, never answers
        holder.settimeout(TIMEOUT)
        task = diagsvc._Probe("qotd", "udp", socket.AF_INET,
                              ("127.0.0.1", 0), holder.getsockname()[1],
                              3.0, 100.0)
        self.addCleanup(task.close)
        for now in (100.0, 101.0, 102.0):
            self.assertEqual(task.wake_time(), now)
            task.on_timer(now)
            self.assertEqual(holder.recv(100), b"diagsvc probe\r\n")
        self.assertEqual(task.sends, 3)
        self.assertEqual(task.wake_time(), 103.0)     # the deadline
        task.on_timer(102.9)
        self.assertIsNone(task.row)
        task.on_timer(103.0)
        self.assertEqual(task.row["verdict"], "no-reply")
        self.assertEqual(task.row["detail"], "nothing within 3 s: filtered, "
                                             "or closed with ICMP blocked")

    def test_table_columns_are_as_wide_as_their_widest_cell(self):
        self.assertEqual(diagsvc._table(
            [{"a": "x", "b": "1"}, {"a": "longer", "b": "22"}],
            [("A", lambda r: r["a"]), ("BB", lambda r: r["b"])]),
            "A       BB\nx       1\nlonger  22\n")

    def test_probe_exits_1_when_only_some_rows_fail(self):
        server = self.start_server(["echo"], transports=["tcp"])
        # In this process, not a child: the same main(), without the
        # interpreter's start-up.
        from unittest import mock
        stdout, stderr = io.StringIO(), io.StringIO()
        with mock.patch.object(sys, "stdout", stdout), \
                mock.patch.object(sys, "stderr", stderr):
            status = diagsvc.main(["probe", "127.0.0.1", "echo", "--timeout",
                                   "1", "--json"] + self.port_options(server))
        rows = json.loads(stdout.getvalue())
        self.assertEqual([(r["transport"], r["verdict"]) for r in rows],
                         [("tcp", "open"), ("udp", "refused")])
        for row in rows:
            self.assertLessEqual(PROBE_KEYS, set(row))
        self.assertEqual(status, 1, stderr.getvalue())

    def test_measure_rates_are_bytes_over_a_million_over_seconds(self):
        server = self.start_server(["echo", "chargen", "discard"])
        rows = diagsvc.measure("127.0.0.1", ["download", "upload", "echo"],
                               seconds=0.15, ports=ports_of(server))
        # 0.15 s windows, small on purpose: seconds rounded to 0.01 s is
        # still within 3.4 % of the window, inside the 5 % allowed below.
        self.assertEqual([row["test"] for row in rows],
                         ["download", "upload", "echo"])
        for row in rows:
            with self.subTest(test=row["test"]):
                self.assertEqual(row["unit"], "MB/s")
                self.assertGreater(row["bytes"], 0)
                self.assertGreater(row["seconds"], 0.12)
                rate = row["bytes"] / 1e6 / row["seconds"]
                # seconds is rounded to 0.01 s, value to 0.1 MB/s.
                self.assertLess(abs(row["value"] - rate), 0.05 * rate + 0.1,
                                row)

    def test_every_measure_row_has_its_keys_and_renders(self):
        server = self.start_server(max_per_source=0)
        # The JSON run and the table run (below) go at once: each is six
        # fixed windows, which is the time this test takes, and their
        # figures are not compared.  --seconds 0.3 is small on purpose
        # (only that every row is there and renders is checked), yet long
        # enough that a loaded machine's stall leaves each window a sample.
        command = [sys.executable, SCRIPT, "measure", "127.0.0.1",
                   "--seconds", "0.3"] + self.port_options(server)
        runs = [subprocess.Popen(command + extra, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE,
                                 universal_newlines=True)
                for extra in (["--json"], [])]
        for run in runs:
            self.addCleanup(run.wait)
            self.addCleanup(run.kill)       # a no-op once it has exited
        (json_out, json_err), (table_out, table_err) = [
            run.communicate(timeout=60) for run in runs]
        self.assertEqual(runs[0].returncode, 0, json_err)
        rows = json.loads(json_out)
        self.assertEqual(sorted(set(row["test"] for row in rows)),
                         sorted(MEASURE_KEYS))
        for row in rows:
            with self.subTest(test=row["test"], transport=row["transport"]):
                self.assertLessEqual(MEASURE_KEYS[row["test"]], set(row))
                self.assertEqual(row["address"], "127.0.0.1")
                self.assertEqual(row["port"], ports_of(server)[
                    diagsvc._MEASURE_SERVICE.get(row["test"], "daytime")])
        self.assertIn("loss_pct", [r for r in rows if r["test"] == "latency"
                                   and r["transport"] == "udp"][0])
        # The same run as a table: every test's row renders.
        result = subprocess.CompletedProcess(runs[1].args, runs[1].returncode,
                                             table_out, table_err)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertRegex(lines[0], r"^TEST +PROTO +RESULT +DETAIL$")
        self.assertEqual([line.split()[:2] for line in lines[1:]], [
            ["latency", "tcp"], ["latency", "udp"], ["download", "tcp"],
            ["upload", "tcp"], ["echo", "tcp"], ["connect", "tcp"]])
        self.assertRegex(result.stdout, r"\nlatency +udp +[0-9.]+ (µ|u)s +\d+ "
                                        r"round trips; min [0-9.]+ p90 [0-9.]+ "
                                        r"p99 [0-9.]+ max [0-9.]+ (µ|u)s; "
                                        r"loss [0-9.]+ %\n")
        self.assertRegex(result.stdout, r"\ndownload +tcp +[0-9.]+ MB/s +"
                                        r"[0-9.]+ MB in [0-9.]+ s; wrong "
                                        r"bytes 0\n")
        self.assertRegex(result.stdout, r"\nupload +tcp +[0-9.]+ MB/s +"
                                        r"[0-9.]+ MB in [0-9.]+ s")
        self.assertRegex(result.stdout, r"\necho +tcp +[0-9.]+ MB/s +[0-9.]+"
                                        r" MB in [0-9.]+ s; wrong bytes 0; "
                                        r"missing 0\n")
        self.assertRegex(result.stdout, r"\nconnect +tcp +[0-9.]+ conn/s +"
                                        r"\d+ daytime connections; p50 "
                                        r"[0-9.]+ p99 [0-9.]+ (µ|u)s; "
                                        r"errors \d+( \(.*\))?\n")

    def test_measure_exits_1_when_bytes_were_wrong(self):
        corrupt = CorruptChargenServer(wrong_at=5000)
        self.addCleanup(corrupt.close)
        # In this process, not a child: the same main(), without the
        # interpreter's start-up.  The wrong byte is in the first 7 KB,
        # the first read; 0.15 s is small on purpose but no shorter than
        # the 0.1 s windows every measure row must fill in the test above.
        from unittest import mock
        stdout, stderr = io.StringIO(), io.StringIO()
        with mock.patch.object(sys, "stdout", stdout), \
                mock.patch.object(sys, "stderr", stderr):
            status = diagsvc.main(["measure", "127.0.0.1", "download",
                                   "--seconds", "0.15", "--port",
                                   "chargen=%d" % corrupt.port])
        self.assertEqual(status, 1, stderr.getvalue())
        self.assertRegex(stdout.getvalue(), r"wrong bytes 1 \(first at byte "
                                            r"5000\)")



class MeasureArithmeticTest(unittest.TestCase):
    """The loaded row and the thresholds, on made-up figures."""

    def test_loaded_row(self):
        class Pinger(object):
            transport = "udp"
            samples = {"idle": [0.001, 0.002], "loaded": [0.003]}
            lost = {"idle": 2, "loaded": 0}
        row = diagsvc._loaded_row(Pinger(), {}, 1)
        # 2 lost of 4 tries; the value is the loaded p50.
        self.assertEqual((row["idle_loss_pct"], row["loaded_loss_pct"]),
                         (50.0, 0.0))
        self.assertEqual((row["value"], row["idle_p50_us"]), (3000.0, 1000.0))

    def test_thresholds(self):
        class Options(object):
            rtt_percentile = 50
            max_loss = 1.0
            max_rtt = 2.0               # ms
            min_rate = 10.0             # MB/s
        rows = [{"host": "h", "test": "udp", "transport": "udp",
                 "loss_pct": 1.0, "p50_us": 2500.0, "value": 1.0},
                {"host": "h", "test": "connect", "transport": "tcp",
                 "p50_us": 9000.0, "value": 9000.0},
                {"host": "h", "test": "udp", "transport": "udp", "flow": 2,
                 "loss_pct": 5.0, "value": 5.0},
                {"host": "h", "test": "download", "transport": "tcp",
                 "value": 20.0},
                {"host": "h", "test": "upload", "transport": "tcp",
                 "value": 5.0}]
        # Loss at the limit passes; 2.5 ms is above 2 ms; connect's
        # percentiles are whole connections, not RTTs.
        self.assertEqual(diagsvc._threshold_failures(rows, Options()),
                         ["h udp/udp: p50_us 2.5 ms is above --max-rtt 2",
                          "h udp/udp flow 2: loss_pct 5 % is above "
                          "--max-loss 1",
                          "h upload/tcp: 5 MB/s is below --min-rate 10"])



class CheckedArgumentsTest(unittest.TestCase):
    """Pure checks, no loop running: quotes=, limits, --for's text, the
    watchdog's floor, passed sockets' matching, the loop watch's decay."""

    def test_quote_edges(self):
        self.assertEqual(diagsvc.checked_quotes([b"x" * 511]), (b"x" * 511,))
        for quotes in ([b"x" * 512], [b"DEL \x7f"], [b" \r\n"]):
            with self.subTest(quotes=quotes):
                with self.assertRaises(diagsvc.QuoteFileError):
                    diagsvc.checked_quotes(quotes)

    def test_limits_and_durations(self):
        with self.assertRaises(diagsvc.ServerError):
            diagsvc._checked_limit("udp_rate", True)    # not a number
        self.assertEqual([diagsvc._duration_text(seconds) for seconds in
                          (90, 1800, 7200, 5400)],
                         ["90 s", "30 min", "2 h", "90 min"])

    def test_the_loop_watch_decays_by_whole_intervals(self):
        # Driven by hand: 1.5 intervals forgive one return and keep the
        # half, which counts towards the next.
        with diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                            transports=["udp"]) as server:
            peer = ("127.0.0.1", 40000)
            interval = diagsvc.LOOP_RETURN_INTERVAL
            server.loop_suspects = {peer: 3}
            server._returns_decayed = server.now = 0.0
            server.now = 1.5 * interval
            server._age_loop_watch()
            self.assertEqual(server.loop_suspects, {peer: 2})
            server.now = 2.0 * interval
            server._age_loop_watch()
            self.assertEqual(server.loop_suspects, {peer: 1})

    def test_the_watchdog_has_a_floor(self):
        notifier = diagsvc.SystemdNotifier.from_environment(
            {"NOTIFY_SOCKET": "/run/diagsvc-test-notify", "WATCHDOG_USEC":
             "1"}, 1)
        if notifier is None:
            self.skipTest("no AF_UNIX here")
        self.addCleanup(notifier.close)
        self.assertEqual(notifier.watchdog_interval,
                         diagsvc.WATCHDOG_MIN_INTERVAL)

    def test_a_port_two_services_claim_is_refused(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        match = diagsvc._match_sockets
        self.assertEqual(match([(sock, None)], ["echo", "discard"], ("udp",),
                               None, {"discard": port}),
                         [(sock, "discard", "udp")])
        # echo's port plus the offset is discard's --port: a guess.
        with self.assertRaises(diagsvc.ServerError):
            match([(sock, None)], ["echo", "discard"], ("udp",),
                  port - diagsvc.SERVICES["echo"].port, {"discard": port})


# --- Per-packet speed: the busy poll (issue 10) --------------------------------


class BusyPollTest(ServerTestCase):
    """The loop may poll for the next event before it sleeps; the window
    adapts as Linux's cpuidle-haltpoll does, and an idle server sleeps."""

    US = 1e-6

    def window(self, window_us, slept_us, busy_poll_us=500, event=True):
        return round(diagsvc.next_poll_window(
            window_us * self.US, slept_us * self.US, busy_poll_us * self.US,
            event) / self.US, 3)

    def test_the_window_opens_grows_and_is_capped(self):
        # A sleep a poll of busy_poll would have caught opens the window,
        # and each such sleep doubles it, up to busy_poll.
        self.assertEqual(self.window(0, 100), 50.0)
        self.assertEqual(self.window(50, 80), 100.0)
        self.assertEqual(self.window(100, 499), 200.0)
        self.assertEqual(self.window(400, 450), 500.0)
        self.assertEqual(self.window(0, 500), 50.0)
        self.assertEqual(self.window(0, 20, busy_poll_us=30), 30.0)

    def test_the_window_stands_or_shrinks(self):
        self.assertEqual(self.window(100, 90), 100.0)   # within the window
        # A timer, not traffic, ended the sleep: it says nothing.
        self.assertEqual(self.window(100, 300, event=False), 100.0)
        # Longer than busy_poll: halved, and closed below 10 us.
        self.assertEqual(self.window(100, 501), 50.0)
        self.assertEqual(self.window(500, 10 ** 6, event=False), 250.0)
        self.assertEqual(self.window(30, 10 ** 6), 15.0)
        self.assertEqual(self.window(15, 10 ** 6), 0.0)
        self.assertEqual(self.window(0, 10 ** 6), 0.0)

    def test_every_service_answers_with_it(self):
        for selector in diagsvc.SELECTORS:
            with self.subTest(selector=selector.__name__):
                server = self.start_server(selector=selector,
                                           busy_poll=0.0005)
                echo = self.connect(server, "echo")
                for number in range(200):
                    message = b"ping %d\r\n" % number
                    echo.sendall(message)
                    self.assertEqual(recv_exactly(echo, len(message)),
                                     message)
                sock = self.udp_socket()
                port = server.addresses["echo", "udp"][0][1]
                for number in range(50):
                    sock.sendto(b"%d" % number, ("127.0.0.1", port))
                    self.assertEqual(sock.recv(100), b"%d" % number)
                self.assertRegex(
                    recv_to_eof(self.connect(server, "daytime")), DAYTIME)
                self.assertEqual(
                    len(recv_to_eof(self.connect(server, "time"))), 4)
                server.close()
                self.assertEqual(server.stats()["echo", "tcp"]["bytes_in"],
                                 sum(len(b"ping %d\r\n" % n)
                                     for n in range(200)))

    def assert_idle_after(self, setup):
        """After SETUP (code for a child, which starts ``server``), 1.5 s
        of idling cost the server next to nothing (a poll that never
        closed: ~100 %)."""
        cpu, wall = cpu_fraction_of(
            setup +
            "wall, cpu = time.monotonic(), time.process_time()\n"
            "time.sleep(1.5)\n"
            "server.close()\n")
        self.assertGreater(wall, 1.4)
        self.assertLess(cpu, 0.15 * wall)

    def test_an_idle_server_sleeps_after_traffic(self):
        # Ping-pong opens the window; then the server has nothing to do.
        self.assert_idle_after(
            "import socket\n"
            "server = diagsvc.Server(['echo'], bind=['127.0.0.1'],\n"
            "    port_offset=None, transports=['udp'], busy_poll=0.001)\n"
            "server.start()\n"
            "port = server.addresses['echo', 'udp'][0][1]\n"
            "sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "sock.bind(('127.0.0.1', 15000 + port % 4000))\n"
            "sock.settimeout(10)\n"
            "for number in range(500):\n"
            "    sock.sendto(b'%d' % number, ('127.0.0.1', port))\n"
            "    assert sock.recv(10) == b'%d' % number\n")

    def test_a_wide_window_never_delays_a_timer(self):
        # The poll stops at the loop's next timer (here the end of --for),
        # and the sleep after it does not start the timeout over.
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                port_offset=None, transports=["udp"],
                                busy_poll=1.0, duration=0.4)
        self.addCleanup(server.close)
        started = time.monotonic()
        server._poll_window = 1.0
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive())
        self.assertLess(time.monotonic() - started, 0.7)

    def test_the_window_grows_with_traffic_and_closes_when_idle(self):
        server = self.start_server(["echo"], transports=["udp"],
                                   busy_poll=0.2, idle_timeout=0.2)
        sock = self.udp_socket()
        port = server.addresses["echo", "udp"][0][1]
        for number in range(12):
            time.sleep(0.002)   # pacing: longer than the window at first,
                                # well within busy_poll
            sock.sendto(b"%d" % number, ("127.0.0.1", port))
            self.assertEqual(sock.recv(100), b"%d" % number)
        self.assertGreater(server._poll_window, 2 * diagsvc.BUSY_POLL_START)
        # Idle past busy_poll, the sweep's wake-ups (every 50 ms) halve it
        # to nothing.
        wait_until(lambda: server._poll_window == 0.0,
                   message="the window to close")

    def test_an_idle_loop_sleeps_though_its_timer_is_within_the_window(self):
        # busy_poll (0.1 s) longer than the sweep's period (0.05 s): each
        # sweep wakes the loop within busy_poll, and it must not poll again
        # each time, nor keep its window (halved once the spell passes
        # busy_poll, at the first sweeps).
        self.assert_idle_after(
            "server = diagsvc.Server(['echo'], bind=['127.0.0.1'],\n"
            "    port_offset=None, transports=['udp'], busy_poll=0.1,\n"
            "    idle_timeout=0.2)\n"
            "server._poll_window = 0.05\n"
            "server.start()\n"
            "deadline = time.monotonic() + 10\n"
            "while server._poll_window >= 0.05:\n"
            "    assert time.monotonic() < deadline, 'the window stood'\n"
            "    time.sleep(0.01)\n")

    def test_timers_alone_never_open_the_window(self):
        # The sweep wakes an idle loop every 50 ms, well within busy_poll:
        # a timer says nothing of the traffic.
        server = self.start_server(["echo"], transports=["udp"],
                                   busy_poll=1.0, idle_timeout=0.2)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            self.assertEqual(server._poll_window, 0.0)
            time.sleep(0.01)

    def test_a_spell_that_ends_while_timers_run_counts(self):
        # An idle spell that a timer interrupted, ended by an event that
        # the first select(0) finds: the spell (10 ms, within busy_poll)
        # still opens the window.
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                port_offset=None, transports=["udp"],
                                busy_poll=1.0)
        self.addCleanup(server.close)

        class ReadySelector(object):
            def select(self, timeout):
                return ["an event"]

        real, server.selector = server.selector, ReadySelector()
        try:
            server._idle_since = time.monotonic() - 0.01
            self.assertEqual(server._wait_for_events(0.5), ["an event"])
        finally:
            server.selector = real
        self.assertEqual(server._poll_window, diagsvc.BUSY_POLL_START)
        self.assertIsNone(server._idle_since)

    def test_close_ends_a_poll_at_once(self):
        server = self.start_server(["echo"], transports=["tcp"],
                                   busy_poll=1.0)
        echo = self.connect(server, "echo")
        for _ in range(20):
            # Paced, so that the loop runs dry between round trips (on a
            # busy machine this thread could otherwise send the next one
            # while the loop still holds the last, and the loop never
            # sleeps).
            time.sleep(0.002)
            echo.sendall(b"x")
            self.assertEqual(echo.recv(1), b"x")
        # Every sleep between round trips was within busy_poll (a second),
        # so the window opened.
        self.assertGreaterEqual(server._poll_window, diagsvc.BUSY_POLL_START)
        started = time.monotonic()
        server.close()
        self.assertLess(time.monotonic() - started, 0.9)
        self.assertFalse(server._running)

    def test_the_library_never_polls_by_default(self):
        server = diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                port_offset=None)
        self.addCleanup(server.close)
        self.assertEqual(server.busy_poll, 0.0)

    def test_the_constructor_refuses_a_window_past_a_second(self):
        for value in (1.5, -0.001, float("nan"), float("inf")):
            with self.subTest(value=value):
                with self.assertRaises(diagsvc.ServerError):
                    diagsvc.Server(["echo"], bind=["127.0.0.1"],
                                   port_offset=None, busy_poll=value)

    def test_the_command_line_default_needs_a_spare_cpu(self):
        from unittest import mock
        self.assertEqual(diagsvc._busy_poll_seconds(250), 0.00025)
        self.assertEqual(diagsvc._busy_poll_seconds(0), 0.0)
        for cpus, window in ((1, 0.0), (None, 0.0),
                             (2, diagsvc.DEFAULT_BUSY_POLL)):
            with mock.patch.object(os, "cpu_count", return_value=cpus):
                self.assertEqual(diagsvc._busy_poll_seconds(None), window)

    def test_the_command_line_refuses_bad_windows_in_one_line(self):
        for value in ("2000000", "-1", "nan", "inf"):
            with self.subTest(value=value):
                status, out, err = main_in_process(
                    "echo", "--udp", "--bind", "127.0.0.1", "--port",
                    "echo=0", "--busy-poll", value)
                self.assertEqual(status, 2)
                self.assertEqual(out, "")
                last = err.splitlines()[-1]
                self.assertTrue(last.startswith("diagsvc: error: "), last)
                self.assertIn("--busy-poll", last)


class OneSegmentReplyTest(ServerTestCase):
    """Linux: a one-shot reply and its FIN leave in one segment (MSG_MORE
    before the half-close), so the client receives two segments in all:
    the SYN-ACK, then the reply with the FIN."""

    def segments_received(self, sock):
        # struct tcp_info: tcpi_segs_in is the u32 at offset 140 (Linux 4.2)
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        if len(info) < 144:
            self.skipTest("tcp_info has no tcpi_segs_in here")
        return struct.unpack_from("=I", info, 140)[0]

    def test_reply_and_fin_arrive_together(self):
        if not ON_LINUX or not hasattr(socket, "TCP_INFO"):
            self.skipTest("Linux only (MSG_MORE, TCP_INFO)")
        for host, _ in FAMILIES:
            server = self.start_server(["daytime", "qotd", "time"],
                                       host=host, transports=["tcp"])
            for service in ("daytime", "qotd", "time"):
                with self.subTest(host=host, service=service):
                    sock = self.connect(server, service, host)
                    reply = recv_to_eof(sock)
                    self.assertGreater(len(reply), 3)
                    self.assertEqual(self.segments_received(sock), 2)


if __name__ == "__main__":
    unittest.main()
