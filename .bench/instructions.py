"""User-space instructions a UDP echo datagram or a daytime connection costs.

    python3 .bench/instructions.py udp|daytime [SCRIPT]

Runs the workload twice under valgrind's callgrind (small and large, in
one process: the server's loop and a loopback client), and prints the
difference divided by the extra operations, so that start-up cancels out.
Instruction counts are repeatable whatever else the machine does; the
client's share is included.  udp: loop passes over 16 queued echo
datagrams (the endpoint's on_event called directly); daytime: sequential
connections to a started Server.  Linux, valgrind needed.
"""
import importlib.util
import os
import re
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"udp": (100, 600), "daytime": (200, 1200)}


def load(path):
    spec = importlib.util.spec_from_file_location("diagsvc_measured", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def udp(diagsvc, passes, burst=16):
    server = diagsvc.Server(["echo"], bind=["127.0.0.1"], port_offset=None,
                            transports=["udp"])
    endpoint = server.endpoints[0]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 15555))
    client.connect(server.addresses["echo", "udp"][0])
    client.setblocking(False)
    sequence = 0
    for number in range(passes):
        for _ in range(burst):
            client.send(b"%063d" % sequence)
            sequence += 1
        endpoint.on_event(1)
        for _ in range(burst):
            client.recv(100)
        if number % 200 == 0:
            server.forget_old_replies()
    server.close()
    return passes * burst


def daytime(diagsvc, connections):
    server = diagsvc.Server(["daytime"], bind=["127.0.0.1"], port_offset=None,
                            transports=["tcp"], max_per_source=0)
    server.start()
    for _ in range(connections):
        sock = socket.create_connection(server.addresses["daytime", "tcp"][0])
        while sock.recv(100):
            pass
        sock.close()
    server.close()
    return connections


def main():
    kind = sys.argv[1]
    script = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        HERE, "..", "diagsvc.py")
    if len(sys.argv) > 3:                       # the child, under valgrind
        print(globals()[kind](load(script), int(sys.argv[3])))
        return
    counts = []
    for size in SIZES[kind]:
        with tempfile.NamedTemporaryFile() as out:
            run = subprocess.run(
                ["valgrind", "--tool=callgrind",
                 "--callgrind-out-file=" + out.name, sys.executable,
                 os.path.abspath(__file__), kind, script, str(size)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True, check=True)
        operations = int(run.stdout.split()[-1])
        counts.append((operations, int(re.search(
            r"Collected : (\d+)", run.stderr).group(1))))
    (few, small), (many, large) = counts
    print("%s: %d instructions an operation (%s)" % (
        kind, (large - small) // (many - few), script))


if __name__ == "__main__":
    main()
