"""The sd_notify protocol against a socket standing in for systemd: READY=1 once the listeners
are bound, WATCHDOG=1 keep-alives at half WATCHDOG_USEC, STOPPING=1 on SIGTERM."""
import os
import signal
import socket
import tempfile

from conftest import start_agent


def _messages(sock, until, limit=50):
    seen = []
    for _ in range(limit):
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        seen.append(fields)
        if until in fields:
            return seen
    raise AssertionError(f"no {until} among {seen}")


def _notify_socket(directory, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"fpga-notify-{os.getpid()}-{os.path.basename(directory)}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = os.path.join(directory, "notify.sock")
        sock.bind(address)
    sock.settimeout(60)
    return sock, address


def _run(abstract):
    with tempfile.TemporaryDirectory(prefix="fpga-notify-") as directory:
        sock, address = _notify_socket(directory, abstract)
        with sock:
            agent = start_agent(directory, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
            try:
                ready = _messages(sock, "READY")[-1]
                assert ready["READY"] == "1"
                assert ready["MAINPID"] == str(agent.process.pid)
                assert ready["STATUS"].startswith("serving: 2 cards")
                # Keep-alives keep coming while the engine answers.
                for _ in range(2):
                    assert _messages(sock, "WATCHDOG")[-1]["WATCHDOG"] == "1"
                agent.process.send_signal(signal.SIGTERM)
                assert _messages(sock, "STOPPING")[-1]["STOPPING"] == "1"
                assert agent.process.wait(timeout=30) == 0
            finally:
                if agent.process.poll() is None:
                    agent.process.kill()


def test_ready_watchdog_stopping_on_a_path_socket():
    _run(abstract=False)


def test_ready_on_an_abstract_socket():
    _run(abstract=True)
