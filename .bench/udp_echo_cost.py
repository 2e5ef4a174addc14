"""The server's CPU time per UDP echo datagram, over loopback.

Starts diagsvc.py (echo over UDP only, 127.0.0.1, any free port) in a child
process, sends COUNT distinct sequence-numbered 32-byte datagrams from one
client socket, WINDOW in flight at a time (so the kernel drops none), and
prints the server's CPU time (user + system, from /proc) per datagram.
Linux only.  Usage: python3 .bench/udp_echo_cost.py [COUNT [SCRIPT]]
"""
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
SCRIPT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "..", "diagsvc.py")
WINDOW = 32


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


server = subprocess.Popen(
    [sys.executable, SCRIPT, "echo", "--udp", "--port", "echo=0", "--bind",
     "127.0.0.1", "-q"], stdout=subprocess.PIPE, universal_newlines=True)
try:
    port = int(server.stdout.readline().split()[-1])
    server.stdout.readline()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5.0)
    client.connect(("127.0.0.1", port))
    sent = received = 0
    before = cpu_seconds(server.pid)
    while received < COUNT:
        while sent < COUNT and sent - received < WINDOW:
            client.send(b"%031d\n" % sent)
            sent += 1
        client.recv(64)
        received += 1
    used = cpu_seconds(server.pid) - before
    print("%d datagrams: server CPU %.2f s, %.2f us a datagram" % (
        COUNT, used, used * 1e6 / COUNT))
finally:
    server.terminate()
    server.wait()
