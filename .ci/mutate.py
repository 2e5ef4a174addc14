#!/usr/bin/env python3
"""Mutation run for diagsvc: does the suite catch plausible small bugs?

Each entry of MUTANTS below is one small bug (a flipped comparison, an
off-by-one, a dropped line) written as (name, old, new[, equivalent]):
``old`` is a piece of diagsvc.py (one line or a few, exact text) that must
occur exactly once; ``new`` replaces it.  For each mutant the script copies
diagsvc.py and test_diagsvc.py to a temporary folder, applies the one
change, and runs the suite there with unittest (the tests start the script
by their own folder, so the copy is what runs), stopping at the first
failure and running the quickest tests first (their times are taken on the
unmutated suite).  A failing suite (or one over the time limit) has caught
the mutant.

Run from anywhere (standard library only; not part of .ci/run, which runs
exactly the README's test command):

    python3 .ci/mutate.py                  # every mutant, 2 at a time
    python3 .ci/mutate.py -j 1 -t 240      # one at a time, 240 s each
    python3 .ci/mutate.py --only chargen   # names containing "chargen"
    python3 .ci/mutate.py --only segment mtu   # "segment" or "mtu"
    python3 .ci/mutate.py --check          # patterns only: no suite runs
    python3 .ci/mutate.py --only owed --tests test_diagsvc.QotdPromiseTest
                                           # quicker: some tests only
    python3 .ci/mutate.py --python /path/to/python3.6

It prints one line a mutant (caught, SURVIVED, equivalent, STALE) and a
score, and exits 1 if a non-equivalent mutant survived or a pattern is
stale (it no longer matches once, so diagsvc.py changed under it: update
the entry).  A mutant judged equivalent (no test can tell it from the
original, say a performance-only change) has a fourth field with the
reason; it is still run and reported, but its survival fails nothing.
New code comes with its mutants here, in the order of the file.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("diagsvc.py", "test_diagsvc.py", "README.md")   # the tests read the README too

MUTANTS = [
    # --- Pure content ---
    ("chargen_line start", "start = (number - 1) % CHARGEN_LINE_COUNT",
     "start = number % CHARGEN_LINE_COUNT"),
    ("chargen_stream copies", "copies = size // len(period) + 1",
     "copies = size // len(period)"),
    ("line size", "CHARGEN_LINE_SIZE = CHARGEN_LINE_LENGTH + 2",
     "CHARGEN_LINE_SIZE = CHARGEN_LINE_LENGTH + 1"),
    ("udp chargen max", "UDP_CHARGEN_MAX = 512", "UDP_CHARGEN_MAX = 511"),
    ("daytime zero-padded day", '"%s %s %2d %02d:%02d:%02d %d\\r\\n"',
     '"%s %s %02d %02d:%02d:%02d %d\\r\\n"'),
    ("daytime weekday", "_DAY_NAMES[t.tm_wday]", "_DAY_NAMES[t.tm_wday - 1]"),
    ("daytime month", "_MONTH_NAMES[t.tm_mon - 1]",
     "_MONTH_NAMES[t.tm_mon % 12]"),
    ("time epoch", "TIME_EPOCH_OFFSET = 2208988800",
     "TIME_EPOCH_OFFSET = 2208988801"),
    ("time era", 'struct.pack("!I", seconds % (1 << 32))',
     'struct.pack("!I", seconds % (1 << 31))'),
    ("qotd quote lines end at LF only",
     'enumerate(text.split("\\n") + ["%"], 1)',
     'enumerate(text.splitlines() + ["%"], 1)'),
    ("qotd CRLF files", 'if line.endswith("\\r"):', "if False:"),
    ("qotd separator", 'if line.strip(" \\t") == "%":', 'if line == "%":'),
    ("qotd blank quote", "if body.strip():", "if body:"),
    ("qotd 511 limit", "if len(body) > QOTD_MAX:", "if len(body) >= QOTD_MAX:"),
    ("qotd first line", "first_line = number + 1", "first_line = number"),
    ("qotd strips blanks only", ".expandtabs(8).rstrip(\" \")",
     ".expandtabs(8).rstrip()"),
    ("qotd tab width", ".expandtabs(8)", ".expandtabs(4)"),
    ("qotd printable top", 'if not " " <= character <= "~":',
     'if not " " <= character < "~":'),
    ("qotd printable bottom", 'if not " " <= character <= "~":',
     'if not " " < character <= "~":'),
    ("quote file line number", 'number = raw.count(b"\\n", 0, error.start) + 1',
     'number = raw.count(b"\\n", 0, error.start)'),
    ("random_below range", 'return int.from_bytes(os.urandom(4), "big") % limit',
     'return int.from_bytes(os.urandom(4), "big") % max(1, limit - 1)'),

    # --- The services ---
    ("send_owed rest", "self.owed = self.owed[sent:]",
     "self.owed = self.owed[sent + 1:]"),
    ("echo keeps the unsent part",
     "self.owed = memoryview(bytes(buffer[sent:count]))",
     "self.owed = memoryview(bytes(buffer[sent + 1:count]))"),
    ("echo stops reading while owed",
     "            self.set_events(EVENT_WRITE)\n\n\nclass DiscardStream",
     "            self.set_events(EVENT_READ | EVENT_WRITE)\n\n\n"
     "class DiscardStream"),
    ("echo counts bytes in",
     "        self.counters.bytes_in += count\n        self.last_active = "
     "server.now\n        try:",
     "        self.counters.bytes_in += 2 * count\n        self.last_active = "
     "server.now\n        try:"),
    ("discard stays active",
     "        self.counters.bytes_in += count\n        self.last_active = "
     "self.server.now\n\n\n# sendfile()",
     "        self.counters.bytes_in += count\n\n\n# sendfile()"),
    ("chargen half-close keeps streaming",
     "            else:\n                self.set_events(EVENT_WRITE)",
     "            else:\n                self.close()\n                return"),
    ("chargen offset", "self.offset = (offset + sent) % CHARGEN_PERIOD_SIZE",
     "self.offset = (offset + sent + 1) % CHARGEN_PERIOD_SIZE"),
    ("chargen offset modulo the chunk",
     "self.offset = (offset + sent) % CHARGEN_PERIOD_SIZE",
     "self.offset = (offset + sent) % CHARGEN_CHUNK"),
    ("chargen stays active",
     "            self.counters.bytes_out += sent\n            self.last_active"
     " = self.server.now\n\n\nclass OneShotStream",
     "            self.counters.bytes_out += sent\n\n\nclass OneShotStream"),
    ("chargen sendfile fallback",
     "if ring_file is None or error.errno not in _NO_SENDFILE_ERRNOS:",
     "if True:"),
    ("chargen udp next line",
     "endpoint.chargen_line = (line + 1) % CHARGEN_LINE_COUNT",
     "endpoint.chargen_line = (line + 2) % CHARGEN_LINE_COUNT"),
    ("chargen udp size",
     "_random_below(UDP_CHARGEN_MAX + 1)", "_random_below(UDP_CHARGEN_MAX)"),
    ("chargen amplifies",
     'stream_class, amplifies = "chargen", 19, ChargenStream, True',
     'stream_class, amplifies = "chargen", 19, ChargenStream, False'),
    ("one-shots amplify", "    amplifies = True\n", "    amplifies = False\n"),
    ("qotd every quote", "quotes[_random_below(len(quotes))]",
     "quotes[_random_below(len(quotes) - 1)]"),
    ("per-second cache", "if second != self.second:",
     "if self.second is None:"),
    ("echo TCP_NODELAY", "socket.TCP_NODELAY, 1)\n            except OSError:",
     "socket.TCP_NODELAY, 0)\n            except OSError:",
     "Nagle's algorithm only delays data sent while earlier data is "
     "unacknowledged; no test can tell it without timing"),

    # --- The server ---
    ("counter refusals add up",
     "self.refusals[reason] = self.refusals.get(reason, 0) + 1",
     "self.refusals[reason] = 1"),
    ("stats bytes_in", '"bytes_in": self.bytes_in,',
     '"bytes_in": self.bytes_out,'),
    ("deny list", "decision = not self._matches(self.deny, address, index)",
     "decision = True"),
    ("allow only if not denied", "if decision and self.allow:",
     "if self.allow:"),
    ("IPv6 group source", 'return host[:2].lower() == "ff"',
     'return host[:2].lower() == "fe"'),
    ("IPv4 group source", "int(first) >= 224)", "int(first) > 224)"),
    ("group destination", "return packed[0] >= 224 or packed ==",
     "return packed[0] > 224 or packed =="),
    ("accept pauses at EMFILE", "if error.errno in _RESOURCE_ERRNOS:",
     "if False:"),
    ("datagram count", "counters.datagrams += 1", "counters.datagrams += 2"),
    ("datagram bytes out", "counters.bytes_out += len(reply)",
     "counters.bytes_out += 0"),
    ("loop guard ports", "set(port for bound in self.addresses.values() "
     "for _, port in bound))", "set())"),
    ("loop guard low ports", "set(range(UDP_LOWEST_SOURCE_PORT)) | "
     "STANDARD_PORTS |", "STANDARD_PORTS |"),
    ("lowest client port", "UDP_LOWEST_SOURCE_PORT = 1024",
     "UDP_LOWEST_SOURCE_PORT = 1"),
    ("loop guard off", "if self.guarded and address[1] in "
     "server.guarded_ports:", "if address[1] in server.guarded_ports:"),
    ("group destination refused",
     "                    _is_group_destination(destination):",
     "                    False:"),
    ("rate limit applies", "rate_limited = server.udp_rate and "
     "service.amplifies", "rate_limited = False"),
    ("directed broadcast by ipi_spec_dst", "elif local != destination:",
     "elif False:"),
    ("reply from ipi_spec_dst",
     'b"\\0\\0\\0\\0" + local + b"\\0\\0\\0\\0")], destination',
     'b"\\0\\0\\0\\0" + destination + b"\\0\\0\\0\\0")], destination'),
    ("pktinfo IPv4", "                return 4\n", "                return 0\n"),
    ("pktinfo IPv6", "                return 6\n", "                return 0\n"),
    ("waker", 'self.writer.send(b"\\0")', "pass"),
    ("total limit", "elif len(self.streams) >= self.max_connections:",
     "elif len(self.streams) > self.max_connections:"),
    ("per-source limit", "self.per_source.get(self.group_of(source), 0) "
     ">=\n", "self.per_source.get(self.group_of(source), 0) >\n"),
    ("one-shot partial send", "        if sent < len(reply):\n"
     "            sock.setblocking(False)", "        if sent < 0:\n"
     "            sock.setblocking(False)"),
    ("one-shot rest owed", "stream.owed = memoryview(reply)[sent:]",
     "stream.owed = memoryview(reply)[sent + 1:]"),
    ("owed reply half-closes", "            if self.send_owed():\n"
     "                self.half_close()", "            if self.send_owed():\n"
     "                self.set_events(EVENT_READ)"),
    ("per-source release", "remaining = self.per_source.get(group, 0) - 1",
     "remaining = self.per_source.get(group, 0)"),
    ("accept pause ends", "self._accept_paused_until = self.now + "
     "ACCEPT_PAUSE", "self._accept_paused_until = self.now + 3600"),
    ("group source refused",
     "if self.udp_guard and _is_group_address(source):", "if False:"),
    ("bucket capped at the burst",
     "tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)",
     "tokens = max(burst, bucket[0] + (now - bucket[1]) * rate)"),
    ("bucket refill rate",
     "tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)",
     "tokens = min(burst, bucket[0] + (now - bucket[1]) * 2 * rate)"),
    ("bucket stamp", "        bucket[1] = now\n", "        pass\n"),
    ("bucket token threshold", "        if tokens < 1.0:\n"
     "            bucket[0] = tokens", "        if tokens < 0.5:\n"
     "            bucket[0] = tokens"),
    ("rate table full",
     '                if len(buckets) >= RATE_TABLE_MAX:\n'
     '                    return "rate-table-full"',
     '                if False:\n                    return "rate-table-full"'),
    ("prune only full buckets", "if tokens + (now - stamp) * rate >= burst]",
     "if tokens + (now - stamp) * rate > burst]"),
    ("prune keeps limited sources",
     "if tokens + (now - stamp) * rate >= burst]",
     "if tokens + (now - stamp) * rate >= 0]"),
    ("sweep a quarter of the timeout",
     "min(MAX_TIMER_WAIT, self.idle_timeout / 4.0)",
     "min(MAX_TIMER_WAIT, self.idle_timeout / 2.0)"),
    ("next sweep", "self._next_sweep = now + self._sweep_interval()",
     "self._next_sweep = now + 2 * self._sweep_interval()"),
    ("idle timeout 0 means never",
     "            if self.idle_timeout:\n                deadline",
     "            if True:\n                deadline"),
    ("idle deadline", "deadline = now - self.idle_timeout",
     "deadline = now - 2 * self.idle_timeout"),
    ("idle comparison", "if s.last_active < deadline and not (",
     "if s.last_active > deadline and not ("),
    ("sweep prunes buckets",
     "            if self._rate_buckets or self._echo_buckets:\n"
     "                self._prune_rate_buckets()",
     "            if False:\n                self._prune_rate_buckets()"),
    ("loop sleeps", "ready = select(wait if wait > 0.0 else 0.0)",
     "ready = select(0.0)"),
    ("loop runs timers", "if self.now >= self._next_timer and not "
     "self._stop_requested:", "if False:"),
    ("spurious readiness", "if isinstance(error, BlockingIOError):\n"
     "            # Readiness", "if False:\n            # Readiness"),
    ("shutdown wakes", "if waker is not None and not self._closed:\n"
     "            waker.wake()", "if waker is not None and self._closed:\n"
     "            waker.wake()"),
    ("close closes streams", "            for stream in list(self.streams):\n"
     "                self._quietly(self.close_stream, stream)",
     "            for stream in []:\n"
     "                self._quietly(self.close_stream, stream)"),
    ("close closes the ring", "self._quietly(self._close_ring)", "pass"),
    ("burst at least 1", "self.udp_burst = max(1, _checked_limit(",
     "self.udp_burst = max(0, _checked_limit("),
    ("port 0 shared by transports",
     "if chosen == 0:\n                            chosen = "
     "sock.getsockname()[1]", "if False:\n                            "
     "chosen = sock.getsockname()[1]"),
    ("any free port is tried again", "if port != 0 or attempt == "
     "PORT_ZERO_ATTEMPTS - 1:", "if True:"),
    ("one-shot half-close", "            try:\n"
     "                sock.shutdown(socket.SHUT_WR)\n"
     "            except OSError:             # reset already",
     "            try:\n                pass\n"
     "            except OSError:             # reset already"),
    ("log counters unit", '"connections" if transport == "tcp" else '
     '"datagrams",', '"datagrams" if transport == "tcp" else '
     '"connections",'),

    # --- The server: issue 8's loop watch, log bucket, source groups, scopes
    ("scope rule matches its interface only",
     "if address in network and (scope is None or scope == index):",
     "if address in network:"),
    ("IPv6 needs an interface: link-local",
     "return packed[0] == 0xFF or (packed[0] == 0xFE and packed[1] & 0xC0 "
     "== 0x80)", "return packed[0] == 0xFF"),
    ("source group mask", 'number = int.from_bytes(packed, "big") >> shift '
     '<< shift', 'number = int.from_bytes(packed, "big")'),
    ("IPv6 /64 by default", "DEFAULT_IPV6_PREFIX = 64",
     "DEFAULT_IPV6_PREFIX = 128"),
    ("echo rate applies", "self.echo_limited = server.udp_echo_rate and "
     "self.echoes", "self.echo_limited = False"),
    ("loop watch on", "self.watch_loops = (server.udp_guard and",
     "self.watch_loops = (False and"),
    ("loop watch sees returns", "if key in server.replied or key in "
     "server.replied_before:", "if key in server.replied:"),
    ("loop watch remembers non-echo replies",
     "if watch_loops and (self.echoes or reply):",
     "if watch_loops and self.echoes:"),
    ("loop returns threshold", "if returns >= LOOP_RETURNS:\n"
     '            return "loop-detected"', "if returns >= 2 * LOOP_RETURNS:\n"
     '            return "loop-detected"'),
    ("loop returns decay", "forgiven = int((now - self._returns_decayed) / "
     "LOOP_RETURN_INTERVAL)", "forgiven = 0"),
    ("loop watch ages", "if now - self._replies_aged >= LOOP_MEMORY:",
     "if False:"),
    ("log queue bound", "if self.thread is None or "
     "len(self.lines) >= LOG_QUEUE_MAX:", "if self.thread is None:"),
    ("log bucket", "tokens = min(float(LOG_BURST), self._log_tokens +",
     "tokens = max(float(LOG_BURST), self._log_tokens +"),
    ("log suppressed report", "if held_back and self.now - "
     "self._suppressed_report_time >= \\\n",
     "if False and self.now - self._suppressed_report_time >= \\\n"),
    ("refusal log per source group", "key = (reason, self.group_of(source))",
     "key = (reason, source)"),

    ("select() past FD_SETSIZE refused", "elif (self._select_based and not "
     "self.can_watch(sock) and", "elif (False and"),
    ("one-shot linger ends", "s.last_active < linger_deadline]:",
     "s.last_active < linger_deadline - 3600]:"),
    ("one-shot linger waits for owed bytes", "                           "
     "s.owed is None and\n", "                           True and\n"),
    # --- Privileges ---
    ("drop supplementary groups", "    os.setgroups([])\n", "    pass\n"),
    ("root keeps root", 'if os.geteuid() != 0 or user == "root":',
     "if os.geteuid() != 0:"),

    # --- The client side ---
    ("chargen alignment", "offset = (line * CHARGEN_LINE_SIZE - start - 2) "
     "% CHARGEN_PERIOD_SIZE", "offset = (line * CHARGEN_LINE_SIZE - start - 1"
     ") % CHARGEN_PERIOD_SIZE"),
    ("clock offset window", "if -2.0 < offset < 1.0:",
     "if -2.0 < offset < 10.0:"),
    ("daytime detail month", "index(parts[1].lower()) + 1",
     "index(parts[1].lower())"),
    ("time detail era", "value += era * round((time.time() - value) / era)",
     "value += 0"),
    ("judge echo length", "if len(data) != len(sent):", "if False:"),
    ("judge discard", 'if data:\n            return "wrong", "discard sent',
     'if False:\n            return "wrong", "discard sent'),
    ("judge udp chargen max",
     'if transport == "udp" and len(data) > UDP_CHARGEN_MAX:',
     'if transport == "udp" and len(data) >= UDP_CHARGEN_MAX:'),
    ("judge time length", "if len(data) != 4:", "if len(data) > 4:"),
    ("judge qotd length", "if len(data) >= 512:", "if len(data) > 512:"),
    ("probe deadline", "self.deadline = now + timeout",
     "self.deadline = now + 2 * timeout"),
    ("probe sends three times", 'if self.transport == "udp" and '
     'self.sends < 3:', 'if self.transport == "udp" and self.sends < 2:'),
    ("probe resend spacing", "self.next_send = now + self.timeout / 3.0",
     "self.next_send = now + self.timeout / 2.0"),
    ("probe refused", "if code == errno.ECONNREFUSED or code == 10061:",
     "if code == 10061:"),
    ("probe udp discard", 'if self.service == "discard":\n'
     '                self.finish("open|filtered"',
     'if False:\n                self.finish("open|filtered"'),
    ("probe udp rtt", "self.rtt = now - self.last_send", "self.rtt = 0.0"),
    ("probe verdicts that pass", 'PROBE_OK = ("open", "open|filtered")',
     'PROBE_OK = ("open",)'),
    ("probe exit status", 'return 0 if all(row["verdict"] in PROBE_OK',
     'return 0 if any(row["verdict"] in PROBE_OK'),
    ("latency loss", "row[\"loss_pct\"] = round(100.0 * lost /",
     "row[\"loss_pct\"] = round(100.0 * (lost + 1) /"),
    ("download ring start", "line = buffer[0] - 32 if 32 <= buffer[0] < 127",
     "line = buffer[0] - 33 if 32 <= buffer[0] < 127"),
    ("download offset", "flow.offset = (offset + count) % CHARGEN_PERIOD_SIZE",
     "flow.offset = (offset + count + 1) % CHARGEN_PERIOD_SIZE"),
    ("count wrong bytes", "sum(1 for a, b in zip(received, expected) if a != b)",
     "sum(1 for a, b in zip(received, expected) if a == b)"),
    ("download MB/s",
     '"unit": "MB/s",\n           "value": round(total / 1e6 / window, 1), '
     '"bytes": total,\n           "seconds": round(window, 2), "parallel": '
     'parallel,\n           "wrong_bytes": wrong}',
     '"unit": "MB/s",\n           "value": round(total / 1e3 / window, 1), '
     '"bytes": total,\n           "seconds": round(window, 2), "parallel": '
     'parallel,\n           "wrong_bytes": wrong}'),
    ("upload MB/s",
     '"value": round(total / 1e6 / window, 1), "bytes": total,\n'
     '           "seconds": round(window, 2), "parallel": parallel,\n'
     '           "drained"',
     '"value": round(total * 1e6 / window, 1), "bytes": total,\n'
     '           "seconds": round(window, 2), "parallel": parallel,\n'
     '           "drained"'),
    ("upload bytes", "flow.bytes += flow.sock.send(block)",
     "flow.bytes += 2 * flow.sock.send(block)"),
    ("echo MB/s", '"value": round(echoed_in_window / 1e6 / window, 1),',
     '"value": round(echoed_in_window / 1e5 / window, 1),'),
    ("echo missing", '"missing_bytes": state["sent"] - state["received"]}',
     '"missing_bytes": state["sent"] - state["received"] - 1}'),
    ("measure port",
     'row["port"] = all_ports[_MEASURE_SERVICE.get(row["test"],',
     'row["port"] = all_ports[_MEASURE_SERVICE.get("echo",'),

    ("nearest rank", "rank = max(1, -(-percent * len(ordered) // 100))",
     "rank = max(1, percent * len(ordered) // 100 + 1)"),
    ("measure fails without round trips",
     'if test == "latency" and not row["count"] and "error" not in row:',
     "if False:"),
    ("measure fails without bytes",
     'if test in ("download", "upload", "echo") and not row["bytes"]:',
     "if False:"),
    ("measure fails when not drained",
     'if test == "upload" and not row["drained"] and \\\n',
     'if False and \\\n'),
    ("measure fails on returned bytes", 'if row.get("returned_bytes"):',
     "if False:"),

    # --- The command line ---
    ("port range", "not port.isdigit() or \\\n            int(port) > 65535:",
     "not port.isdigit() or \\\n            int(port) > 65536:"),
    ("non-negative", "        if value < 0 or value != value",
     "        if value < -1 or value != value"),
    ("default verbosity", "verbosity=max(0, 1 + options.verbose - "
     "options.quiet),", "verbosity=max(0, options.verbose - "
     "options.quiet),"),
    ("counters at exit", "if server.verbosity:\n            "
     "server.log_counters()", "if False:\n            server.log_counters()"),
    ("table widths", "widths = [max(len(line[i]) for line in cells)",
     "widths = [min(len(line[i]) for line in cells)"),
    ("detail first wrong byte",
     'text += " (first at byte %d)" % row["first_wrong_byte"]', "pass"),
    ("detail loss", 'text += "; loss %s %%" % row["loss_pct"]', "pass"),
    ("detail missing", 'text += "; missing %d" % row["missing_bytes"]',
     "pass"),
    ("ascii terminal", 'text = text.replace(u"\\u00b5", "u")', "pass"),
    ("measure exit on wrong bytes", 'if row.get("wrong_bytes"):\n'
     '        reasons.append', 'if False:\n        reasons.append'),
    ("SIGTERM stops", "    signal.signal(signal.SIGTERM, stop)\n", ""),

    # --- issue 10: answer(), send_reply(), the UDP_SEGMENT fast path ---
    ("answer counts bytes in",
     "        counters.bytes_in += len(payload)\n        server = self.server",
     "        counters.bytes_in += 0\n        server = self.server"),
    ("answer forgets empty chargen replies",
     "if watch_loops and (self.echoes or reply):\n            if not "
     "self.echoes:", "if watch_loops:\n            if not self.echoes:"),
    ("answer loop table bound", "if len(replied) >= LOOP_TABLE_MAX:",
     "if False:"),
    ("send_reply from pktinfo", "if reply_info is not None:\n"
     "                self.sock.sendmsg([reply], reply_info, 0, address)",
     "if False:\n"
     "                self.sock.sendmsg([reply], reply_info, 0, address)"),
    ("send_reply failure counted", "            self.send_failed(reply, "
     "address)\n            return False", "            return False"),
    ("send_failed takes bytes back",
     "self.counters.bytes_out -= len(reply)", "pass"),
    ("segmentation on Linux only", "if not (_ON_LINUX and _HAS_MSG):",
     "if True:"),
    ("segmenting switch", "segment_max = SEGMENT_MAX if self.segmenting "
     "else 0", "segment_max = SEGMENT_MAX"),
    ("segment run one address", "                        address == "
     "run_address and\n", ""),
    ("segment run no longer reply", "if (run_open and 0 < size <= run_size "
     "and", "if (run_open and 0 < size and"),
    ("segment run closes after a short one", "run_open = size == run_size",
     "run_open = True"),
    ("segment size", 'struct.pack("@H", size))]',
     'struct.pack("@H", size + 1))]'),
    ("segmenting stops on EINVAL", "                self.segmenting = "
     "False\n", "                pass\n"),
    ("segment run refused: one by one", "            for reply in replies:\n"
     "                self.send_reply(reply, reply_info, address)",
     "            for reply in replies[:1]:\n"
     "                self.send_reply(reply, reply_info, address)"),

    # --- issue 11: measure udp, loaded, mtu, --interval, thresholds ---
    ("stream datagram minimum size",
     "payload = bytearray(max(size, STREAM_MIN_SIZE))",
     "payload = bytearray(size)"),
    ("stream datagram magic", "if len(data) < STREAM_MIN_SIZE or "
     "bytes(data[:4]) != _STREAM_MAGIC:", "if len(data) < STREAM_MIN_SIZE:"),
    ("stream tally foreign", "if sequence >= self.sent:",
     "if sequence > self.sent:"),
    ("stream tally duplicates", "            self.duplicated += 1\n",
     "            self.duplicated += 0\n"),
    ("stream tally reordered", "if sequence < self.highest:",
     "if sequence < self.highest - 1:"),
    ("stream on time", "rtt if rtt <= wait else -1.0",
     "rtt if rtt < wait else -1.0"),
    ("stream late is not lost", "lost = sent - received - late",
     "lost = sent - received"),
    ("stream IPDV consecutive", "zip(by_sequence, by_sequence[1:])",
     "zip(by_sequence, by_sequence[2:])"),
    ("stream PDV p99", 'round(figures["p99_us"] - figures["min_us"], 1)',
     'round(figures["p90_us"] - figures["min_us"], 1)'),
    ("stream size from bitrate", "size = int(round(bitrate / 8.0 / rate))",
     "size = int(round(bitrate / rate))"),
    ("stream rate from bitrate", "rate = bitrate / 8.0 / size",
     "rate = bitrate / size"),
    ("stream at most two", "if rate and bitrate and size:", "if False:"),
    ("stream smallest size", "if not STREAM_MIN_SIZE <= size <= largest:",
     "if not STREAM_MIN_SIZE < size <= largest:"),
    ("udp flow other flows' replies", "if parsed is None or parsed[0] != "
     "self.id:", "if parsed is None:"),
    ("udp rows per flow", "if parallel > 1 else []",
     "if parallel > 0 else []"),
    ("udp rows client limited", "achieved < rate * _STREAM_CATCH_UP",
     "achieved > rate * _STREAM_CATCH_UP"),
    ("udp rows asked share", "round(rate * len(members) / parallel, 1)",
     "round(rate, 1)"),
    ("loaded loss over tries", "tries = len(samples) + pinger.lost[phase]",
     "tries = len(samples)"),
    ("loaded value", 'row["value"] = figures["loaded"].get("p50_us")',
     'row["value"] = figures["idle"].get("p50_us")'),
    ("mtu search midpoint", "size = high if high == fits else (low + high "
     "+ 1) // 2", "size = high if high == fits else (low + high) // 2",
     "rounding the midpoint down finds the same boundary and the same "
     "failure in about as many tries; only the order of the sizes tried "
     "differs, and no promise names that order"),
    ("mtu search retries a loss", 'if failure != "lost" or failed in '
     'confirmed:', "if True:"),
    ("mtu refused size", "failures[high] = (fits + 1, outcome)",
     "failures[high] = (size, outcome)"),
    ("mtu verdict path MTU", 'row["path_mtu_bytes"] = passed + overhead',
     'row["path_mtu_bytes"] = passed'),
    ("mtu verdict ICMP", "elif kernel_mtu and kernel_mtu < failed + "
     "overhead:", "elif kernel_mtu and kernel_mtu < failed:"),
    ("threshold loss", "and row[key] > options.max_loss:",
     "and row[key] >= options.max_loss:"),
    ("threshold rtt unit", "row[key] > options.max_rtt * 1000.0:",
     "row[key] > options.max_rtt * 1e6:"),
    ("threshold rtt not connect", 'if options.max_rtt is not None and '
     'row["test"] != "connect" \\\n', 'if options.max_rtt is not None '
     '\\\n'),
    ("threshold min rate",
     'row["value"] is not None and row["value"] < options.min_rate:',
     'row["value"] is not None and row["value"] > options.min_rate:'),
    ("threshold names the flow", 'name += " flow %s" % row["flow"]',
     "pass"),
    ("interval text counts", 'for key in ("count", "sent", "received", '
     '"errors", "payload_bytes"):', 'for key in ("count", "sent", '
     '"errors", "payload_bytes"):'),

    # --- issue 12: socket activation, sd_notify, --for ---
    ("listen pid", 'if environ.get("LISTEN_PID", "").strip() != str(pid):',
     "if False:"),
    ("listen fds start", "SD_LISTEN_FDS_START = 3",
     "SD_LISTEN_FDS_START = 4"),
    ("listen names count", "if len(names) != count:", "if False:"),
    ("passed socket not inherited", "sock.set_inheritable(False)         "
     "# a child must not hold it open", "pass"),
    ("match port offset", "port = SERVICES[name].port + port_offset",
     "port = SERVICES[name].port"),
    ("match --port first", 'for precedence in ("standard", "offset", '
     '"given"):', 'for precedence in ("given", "offset", "standard"):',
     "a port two services claim is refused as ambiguous (the fix12 "
     "merge), so the order of the claims cannot change a match"),
    ("match refuses a port two services claim",
     "if by_port.get(port, name) != name:", "if False:"),
    ("match listening only",
     "not sock.getsockopt(socket.SOL_SOCKET, accepting):", "False:"),
    ("notify abstract socket", 'address = "\\0" + address[1:]',
     "address = address[1:]"),
    ("watchdog at half", "interval = max(int(usec) / 2e6, "
     "WATCHDOG_MIN_INTERVAL)", "interval = max(int(usec) / 1e6, "
     "WATCHDOG_MIN_INTERVAL)"),
    ("watchdog floor", "interval = max(int(usec) / 2e6, "
     "WATCHDOG_MIN_INTERVAL)", "interval = max(int(usec) / 2e6, 0.0)"),
    ("watchdog for this pid",
     "not watchdog_pid or watchdog_pid == str(pid)):", "True):"),
    ("watchdog pings again", "            self._next_watchdog = now + "
     "notifier.watchdog_interval\n            notifier.send(\"WATCHDOG=1\")",
     "            self._next_watchdog = now + notifier.watchdog_interval\n"),
    ("duration compound: seconds last", 'for unit in "hms":',
     'for unit in "hm":'),
    ("duration hours", '_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}',
     '_DURATION_UNITS = {"s": 1, "m": 60, "h": 360}'),
    ("duration above 0", "if not 0 < seconds <= LIMIT_MAX:",
     "if not 0 <= seconds <= LIMIT_MAX:"),
    ("duration text whole units",
     "if seconds >= size and seconds % size == 0:", "if seconds >= size:"),

    # --- issue 8's second review: checked quotes, limits ---
    ("checked quotes 511", "if len(quote) > QOTD_MAX:",
     "if len(quote) >= QOTD_MAX:"),
    ("checked quotes DEL", "if not (32 <= byte <= 126 or byte in (13, 10)):",
     "if not (32 <= byte <= 127 or byte in (13, 10)):"),
    ("checked quotes blank",
     "if not isinstance(quote, bytes) or not quote.strip():",
     "if not isinstance(quote, bytes):"),
    ("checked limit refuses bool", "if isinstance(value, bool) or not "
     "isinstance(value, kinds) or \\\n", "if not isinstance(value, kinds) "
     "or \\\n"),
    ("loop watch decay keeps the remainder",
     "self._returns_decayed += forgiven * LOOP_RETURN_INTERVAL",
     "self._returns_decayed = now"),
    # --- issue 10: the busy poll, one-segment one-shot replies ---
    ("one-shot reply waits for its FIN",
     "sent = sock.send(reply, _MSG_DONTWAIT | _MSG_MORE)",
     "sent = sock.send(reply, _MSG_DONTWAIT)"),
    ("busy poll caught keeps the window",
     "    if slept <= window:\n        return window\n", ""),
    ("busy poll timer says nothing",
     "if not woken_by_event:\n            return window",
     "if False:\n            return window"),
    ("busy poll window doubles",
     "return min(busy_poll, max(BUSY_POLL_START, 2.0 * window))",
     "return min(busy_poll, max(BUSY_POLL_START, window))"),
    ("busy poll window capped",
     "return min(busy_poll, max(BUSY_POLL_START, 2.0 * window))",
     "return max(BUSY_POLL_START, 2.0 * window)"),
    ("busy poll window halves", "    window /= 2.0\n",
     "    window /= 1.5\n"),
    ("busy poll floor",
     "return window if window >= BUSY_POLL_FLOOR else 0.0",
     "return window"),
    ("busy poll off in the library", "notifier=None, busy_poll=0.0):",
     "notifier=None, busy_poll=0.0005):"),
    ("busy poll used", "if self.busy_poll:\n                select = "
     "self._wait_for_events", "if False:\n                select = "
     "self._wait_for_events"),
    ("busy poll sleeps", "ready = select(max(0.0, timeout - (now - started)))",
     "ready = select(0.0)"),
    ("busy poll stops at the timeout",
     "until = started + min(self._poll_window, timeout)",
     "until = started + self._poll_window"),
    ("busy poll sleeps what is left",
     "ready = select(max(0.0, timeout - (now - started)))",
     "ready = select(timeout)"),
    ("busy poll polls once a spell", "if self._idle_since is None:        "
     "# the spell starts: poll", "if True:"),
    ("busy poll times the whole spell",
     "self._poll_window, monotonic() - self._idle_since,",
     "self._poll_window, monotonic() - now,"),
    ("busy poll tells timers from events",
     "                self.busy_poll, bool(ready))\n",
     "                self.busy_poll, True)\n"),
    ("busy poll adapts", "            self._poll_window = next_poll_window("
     "\n                self._poll_window, monotonic()",
     "            self._poll_window = BUSY_POLL_START or next_poll_window("
     "\n                self._poll_window, monotonic()"),
    ("busy poll counts a spell the timers ended",
     "        ready = select(0.0)\n        if not ready:\n",
     "        ready = select(0.0)\n        if ready:\n"
     "            self._idle_since = None\n            return ready\n"
     "        if not ready:\n"),
    ("busy poll default needs two CPUs",
     "return DEFAULT_BUSY_POLL if (os.cpu_count() or 1) > 1 else 0.0",
     "return DEFAULT_BUSY_POLL"),
]


def locate(source, old):
    """The one index of old in source, or why there is not one."""
    first = source.find(old)
    if first < 0:
        return None, "stale: the pattern no longer matches"
    if source.find(old, first + 1) >= 0:
        return None, "stale: the pattern matches more than once"
    return first, None


# Runs in the mutant's folder: the tests named, quickest first by the times
# in the file argv[1] (written there when it does not exist yet), stopping
# at the first failure.  Python 3.6 syntax.
RUNNER = r"""
import json, os, sys, time, unittest
times_path, names = sys.argv[1], sys.argv[2:]
def flatten(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            for inner in flatten(test):
                yield inner
        else:
            yield test
tests = list(flatten(unittest.defaultTestLoader.loadTestsFromNames(names)))
recording = not os.path.exists(times_path)
times = {}
if not recording:
    with open(times_path) as times_file:
        times = json.load(times_file)
    tests.sort(key=lambda test: times.get(test.id(), 0.0))
result = unittest.TestResult()
result.failfast = True
for test in tests:
    started = time.monotonic()
    test(result)
    times[test.id()] = time.monotonic() - started
    if result.shouldStop or result.errors or result.failures:
        break
for test, text in result.errors + result.failures:
    sys.stderr.write("FAIL: %s\n%s\n" % (test.id(), text))
    break
if recording and result.wasSuccessful():
    with open(times_path, "w") as times_file:
        json.dump(times, times_file)
sys.exit(0 if result.wasSuccessful() else 1)
"""


RUNNING = set()                         # suites running now, to stop them
STOPPING = threading.Event()


def run_suite(folder, python, timeout, tests=("test_diagsvc",),
              times_path=None):
    """(caught, how) for the suite (or the tests named) in folder."""
    environment = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    environment.pop("PYTHONPATH", None)
    process = subprocess.Popen(
        [python, "-c", RUNNER, times_path] + list(tests), cwd=folder,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
        start_new_session=True)
    RUNNING.add(process)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_suite(process)
        return True, "timeout"
    finally:
        RUNNING.discard(process)
    if process.returncode == 0:
        return False, "suite passed"
    lines = stderr.decode("utf-8", "replace").splitlines()
    failed = [line for line in lines if line.startswith("FAIL:")]
    if not failed:
        return True, "exit %d" % process.returncode
    # The failing test and the last line of its traceback (the message).
    last = [line for line in lines if line.strip()][-1]
    return True, "%s: %s" % (failed[0], last[:200])


def stop_suite(process):
    """End a suite and everything it started (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    process.communicate()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("-t", "--timeout", type=float, default=300.0,
                        help="seconds a mutant's suite may take")
    parser.add_argument("--only", nargs="+", default=[""],
                        help="run the mutants whose name contains one of "
                        "these")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--tests", nargs="+", default=["test_diagsvc"],
                        help="unittest names to run (default: the suite)")
    parser.add_argument("--check", action="store_true",
                        help="check the patterns, run nothing")
    options = parser.parse_args()

    with open(os.path.join(ROOT, "diagsvc.py")) as source_file:
        source = source_file.read()
    names = set()
    work = []
    stale = []
    for entry in MUTANTS:
        name, old, new = entry[:3]
        equivalent = entry[3] if len(entry) > 3 else None
        if name in names:
            raise SystemExit("mutate: two mutants named %r" % name)
        names.add(name)
        if not any(part in name for part in options.only):
            continue
        at, problem = locate(source, old)
        if problem:
            stale.append(name)
            print("STALE       %s: %s" % (name, problem))
            continue
        work.append((name, source[:at] + new + source[at + len(old):],
                     equivalent))
    print("mutate: %d mutants, %d stale" % (len(work), len(stale)))
    if options.check:
        return 1 if stale else 0

    times_path = os.path.join(tempfile.mkdtemp(prefix="diagsvc-times-"),
                              "times.json")
    folders = [os.path.dirname(times_path)]
    for _ in range(max(1, options.jobs)):
        folder = tempfile.mkdtemp(prefix="diagsvc-mutant-")
        folders.append(folder)
        for name in FILES:
            shutil.copy(os.path.join(ROOT, name), folder)
    try:
        started = time.monotonic()
        caught, how = run_suite(folders[1], options.python, options.timeout,
                                options.tests, times_path)
        if caught:
            print("mutate: the unmutated suite fails (%s); fix that first"
                  % how)
            return 2
        print("mutate: the unmutated suite passes in %.0f s" % (
            time.monotonic() - started))
        results = {}
        lock = threading.Lock()
        queue = list(work)

        def worker(folder):
            while not STOPPING.is_set():
                with lock:
                    if not queue:
                        return
                    name, text, equivalent = queue.pop(0)
                with open(os.path.join(folder, "diagsvc.py"), "w") as mutant:
                    mutant.write(text)
                begun = time.monotonic()
                caught, how = run_suite(folder, options.python,
                                        options.timeout, options.tests,
                                        times_path)
                if caught:
                    verdict = "caught"
                elif equivalent:
                    verdict = "equivalent"
                else:
                    verdict = "SURVIVED"
                with lock:
                    results[name] = verdict
                    print("%-11s %s (%.0f s): %s" % (
                        verdict, name, time.monotonic() - begun,
                        equivalent if verdict == "equivalent" else how))
                    sys.stdout.flush()

        threads = [threading.Thread(target=worker, args=(folder,))
                   for folder in folders[1:]]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    finally:
        STOPPING.set()                  # Ctrl-C or SIGTERM: stop the suites
        for process in list(RUNNING):
            stop_suite(process)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    survived = sorted(name for name, verdict in results.items()
                      if verdict == "SURVIVED")
    equivalent = sorted(name for name, verdict in results.items()
                        if verdict == "equivalent")
    caught = len(results) - len(survived) - len(equivalent)
    print("\nmutate: %d caught, %d survived, %d equivalent, %d stale "
          "(score %d/%d non-equivalent)" % (
              caught, len(survived), len(equivalent), len(stale), caught,
              caught + len(survived)))
    for name in survived:
        print("mutate: survived: %s" % name)
    return 1 if survived or stale else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(3))
    sys.exit(main())
