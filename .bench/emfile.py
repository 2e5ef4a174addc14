"""Server CPU time while it is out of descriptors (EMFILE) for 5 s.

    python3 .bench/emfile.py

The server runs with RLIMIT_NOFILE 64 and receives 200 connections on
loopback; its CPU time over the episode is read from /proc (Linux).  Then
the clients leave, and one more must be echoed.  Stops what it started.
"""
import os
import re
import resource
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def low_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


server = subprocess.Popen(
    [sys.executable, os.path.join(HERE, "..", "diagsvc.py"), "echo", "--tcp",
     "--bind", "127.0.0.1", "--port", "echo=0", "--max-connections", "1000",
     "--max-per-source", "0", "--user", "root"],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
    preexec_fn=low_limit)
port = int(re.search(r"port (\d+)", server.stdout.readline()).group(1))


def cpu_seconds():
    with open("/proc/%d/stat" % server.pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(
        os.sysconf("SC_CLK_TCK"))


try:
    clients = [socket.create_connection(("127.0.0.1", port))
               for _ in range(200)]
    time.sleep(0.3)
    before, started = cpu_seconds(), time.monotonic()
    time.sleep(5)
    spent, wall = cpu_seconds() - before, time.monotonic() - started
    print("EMFILE episode: %.1f s, server CPU %.3f s (%.1f %% of a core)" % (
        wall, spent, 100 * spent / wall))
    for sock in clients[1:]:
        sock.close()
    fresh = socket.create_connection(("127.0.0.1", port), 5)
    fresh.sendall(b"back")
    print("after the clients left, a new one is echoed: %r" % fresh.recv(4))
finally:
    server.terminate()
    server.wait()
    print(server.stderr.read().strip().splitlines()[0])
