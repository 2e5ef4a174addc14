"""Server memory with 1,000 echo clients that each send 1 MiB and never read.

    python3 .bench/nonreaders.py [CLIENTS]

Loopback only; bounded (60 s of sending at most); stops the server it
started, by its PID.  Prints the server's RSS before and after.
"""
import os
import re
import resource
import select
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
resource.setrlimit(resource.RLIMIT_NOFILE, (CLIENTS + 1024, CLIENTS + 1024))
server = subprocess.Popen(
    [sys.executable, os.path.join(HERE, "..", "diagsvc.py"), "echo", "--tcp",
     "--bind", "127.0.0.1", "--port", "echo=0", "--max-per-source", "0", "-q"],
    stdout=subprocess.PIPE, universal_newlines=True)
port = int(re.search(r"port (\d+)", server.stdout.readline()).group(1))


def rss():
    with open("/proc/%d/status" % server.pid) as status:
        fields = dict(line.split(":", 1) for line in status)
    return fields["VmRSS"].strip()


try:
    print("server RSS, idle: %s" % rss())
    clients, owed = [], {}
    for _ in range(CLIENTS):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        clients.append(sock)
        owed[sock] = 1 << 20
    block = b"x" * 65536
    deadline = time.monotonic() + 60
    while owed and time.monotonic() < deadline:
        writable = select.select([], list(owed)[:900], [], 1.0)[1]
        if not writable:
            break                       # every buffer on the way is full
        for sock in writable:
            try:
                owed[sock] -= sock.send(block[:owed[sock]])
            except BlockingIOError:
                continue
            if not owed[sock]:
                del owed[sock]
    time.sleep(2)                       # let the server settle, then sample
    sent = sum((1 << 20) - owed.get(sock, 0) for sock in clients)
    print("%d clients sent %.1f MiB and read nothing; %d could not send all"
          % (len(clients), sent / 2.0 ** 20, len(owed)))
    print("server RSS, with them: %s" % rss())
    for sock in clients:
        sock.close()
finally:
    server.terminate()
    server.wait()
