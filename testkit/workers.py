"""A stand-in worker for shared.process.serve_workers tests: `python -c WORKER_SCRIPT <service>`.

It binds BULKHEAD_<SERVICE>_LISTEN_ADDR with SO_REUSEPORT as a real worker would, prints one JSON line of
its BULKHEAD_<SERVICE>_* environment (what serve_workers gave it), and serves until SIGTERM (exit 0).
"""

WORKER_SCRIPT = """
import json, os, signal, socket, sys, time
prefix = "BULKHEAD_" + sys.argv[1].upper() + "_"
host, _, port = os.environ[prefix + "LISTEN_ADDR"].rpartition(":")
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind((host, int(port)))
s.listen()
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(prefix)}), flush=True)
while True:
    time.sleep(1)
"""
