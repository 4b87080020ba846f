"""Wires the stages into a running gateway: SMTP edge -> spool -> scheduler -> router.

``run_gateway(cfg)`` binds every listener in the parent, then either runs one worker in
process (``workers = 1``) or forks ``workers`` processes that share the listening sockets
(prefork, like Postfix's smtpd processes) and each own a spool shard ``w<N>``. The parent
restarts a worker that dies and forwards SIGTERM/SIGINT; a worker that gets SIGTERM sends
``421`` to every session, stops its scheduler and exits.

A database server that cannot be reached at start (``StoreUnavailable``) does not stop the
gateway: the banner says so, and each worker starts degraded (``policy.state``: checks that
need the database tempfail) and retries in the background. An unusable database (bad URL,
unwritable SQLite path, newer schema) still stops it with the reason. The first open of a
PostgreSQL database runs in a child process (``store.reach.first_contact``) that gets
``[database] start_wait`` seconds to answer: a server that drops packets does not hold the
listeners back for the connect timeout. Past the wait the banner says NOT ANSWERING, the
workers listen at once (degraded) and keep connecting in the background; a worker the
supervisor restarts waits ``start_wait`` for its own first open likewise.

Public names: ``run_gateway``, ``describe``, ``bind_listeners``.
Security: binds only the addresses the configuration names (SU-9); everything received
is handled by ``smtp`` (untrusted peers). Runs no shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from mailwarden import __version__
from mailwarden.auth.service import build_auth_service
from mailwarden.config import Config, ListenerConfig
from mailwarden.core.events import EventSink, JsonLinesSink, StreamSink, TeeSink, emit, set_sink
from mailwarden.core.events import flush as flush_events
from mailwarden.delivery.router import Router
from mailwarden.errors import StoreError
from mailwarden.policy.engine import Policy
from mailwarden.quarantine.store import Quarantine
from mailwarden.queue.scheduler import Scheduler
from mailwarden.queue.spool import Spool
from mailwarden.scan.arcseal import ArcSealer
from mailwarden.scan.dkimsign import DkimSigner
from mailwarden.scan.factory import build_engine, scanner_labels, scanning_notice
from mailwarden.smtp.content import ContentFilter
from mailwarden.smtp.server import SmtpServer
from mailwarden.smtp.tls import ensure_certificate, server_context
from mailwarden.store import open_store
from mailwarden.store.db import store_label
from mailwarden.store.reach import Answer, first_contact

LISTEN_BACKLOG = 1024  # pending connections per listener before the kernel refuses
WORKER_RESTART_DELAY = 1.0  # seconds before a crashed worker is started again
WORKER_STOP_TIMEOUT = 30.0  # seconds the parent waits for workers after SIGTERM


def bind_listeners(cfg: Config) -> list[tuple[ListenerConfig, socket.socket]]:
    """Bind and listen on every configured listener; raise OSError naming the one that failed."""
    bound: list[tuple[ListenerConfig, socket.socket]] = []
    for listener in cfg.listener:
        family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listener.address, listener.port))
        except OSError as exc:
            sock.close()
            for _, s in bound:
                s.close()
            raise OSError(
                exc.errno,
                f"cannot listen on {listener.address}:{listener.port} ({listener.name}): "
                f"{exc.strerror}",
            ) from exc
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        bound.append((listener, sock))
    return bound


def _tls_label(listener: ListenerConfig) -> str:
    return {"none": "plain", "starttls": "STARTTLS", "implicit": "implicit TLS"}[listener.tls]


def describe(cfg: Config) -> str:
    """The startup banner: what the gateway listens on and where mail goes."""
    lines = [f"mailwarden {__version__} ({cfg.gateway.hostname})"]
    for li in cfg.listener:
        role = "submission" if li.submission else "inbound"
        host = f"[{li.address}]" if ":" in li.address else li.address
        lines.append(f"  listening  {li.name:<11} {host}:{li.port}  {_tls_label(li)}, {role}")
    lines.append(f"  hosted     {', '.join(cfg.gateway.hosted_domains) or '(none)'}")
    for domain in cfg.gateway.hosted_domains:
        spec = cfg.delivery.transport_for(domain)
        if spec is None:
            where = "MX lookup"
        elif spec.kind == "maildir":
            where = f"Maildir under {spec.path or cfg.mail_path}/{domain}/<user>/"
        else:
            where = str(spec)
        lines.append(f"  delivery   {domain} -> {where}")
    others = f"smarthost {cfg.delivery.smarthost}" if cfg.delivery.smarthost else "MX lookup"
    lines.append(f"  delivery   other domains -> {others} (relaying needs policy, see docs)")
    lines.append(f"  scanning   {', '.join(scanner_labels(cfg.scan)) or '(none)'}")
    notice = scanning_notice(cfg.scan)
    if notice:
        lines.append(f"  WARNING    {notice}")
    lines.append(f"  quarantine {cfg.quarantine_path}/")
    lines.append(f"  state      spool {cfg.spool_path}/, events {cfg.events_path}")
    lines.append(f"  workers    {cfg.gateway.workers}")
    return "\n".join(lines)


async def _serve_worker(
    cfg: Config,
    bound: list[tuple[ListenerConfig, socket.socket]],
    index: int,
    db_wait: float | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    spool = Spool(cfg.spool_path, shard=f"w{index}", segment_log=cfg.queue.segment_log)
    router = Router(cfg)
    scheduler = Scheduler(cfg, spool, router)
    policy = Policy(cfg)
    await policy.start(wait=db_wait)  # data store: registered senders, blocks, users
    needs_tls = any(li.tls != "none" for li in cfg.listener)
    ctx = server_context(cfg) if needs_tls else None
    quarantine = Quarantine(cfg.quarantine_path, cfg.quarantine)
    engine = build_engine(cfg.scan, cfg.dns, cfg.gateway.hostname)
    signer = DkimSigner(cfg.dkim, cfg.dkim_path) if cfg.dkim.sign else None
    sealer = (
        ArcSealer(cfg.scan.mailauth, cfg.dkim, cfg.dkim_path, cfg.gateway.hostname)
        if cfg.scan.mailauth.arc_seal
        else None
    )
    content = ContentFilter(engine, quarantine, cfg.gateway.hostname, signer, sealer)
    # SMTP AUTH (SU-8) for the submission listeners; one service (and counters) per worker.
    # While the database is unreachable the AUTH backend opens it at a later AUTH instead.
    connect = not policy.state.unavailable
    submission = any(li.submission for li in cfg.listener)
    auth = build_auth_service(cfg, connect=connect) if submission else None
    servers = [
        SmtpServer(
            cfg, li, ssl_context=ctx, sink=spool, policy=policy, content_filter=content, auth=auth
        )
        for li, _ in bound
    ]
    expiry = asyncio.create_task(quarantine.maintain(cfg.quarantine.expire_interval))
    await scheduler.start()
    for server, (_, sock) in zip(servers, bound, strict=True):
        await server.start(sock)
    emit("gateway.worker_started", worker=index, pid=os.getpid())
    await stop.wait()
    emit("gateway.worker_stopping", worker=index, pid=os.getpid())
    await asyncio.gather(*(s.shutdown() for s in servers), return_exceptions=True)
    await scheduler.stop()
    await policy.close()
    await router.close()
    expiry.cancel()
    await content.close()
    quarantine.close()
    if auth is not None:
        auth.close()
    emit("gateway.worker_stopped", worker=index, pid=os.getpid())


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on uvloop when it is installed (faster sockets), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    uvloop.run(main())


def make_sink(cfg: Config) -> EventSink:
    """The event sink the configuration asks for."""
    sink: EventSink = JsonLinesSink(str(cfg.events_path))
    if cfg.events.stderr:
        sink = TeeSink(sink, StreamSink(2))
    return sink


# Cyclic-GC thresholds of a worker: a message allocates thousands of short-lived objects,
# so the default 700 ran a collection every few messages (~3% of a worker's CPU).
GC_THRESHOLDS = (20_000, 50, 100)


def _tune_gc() -> None:
    """Move what start-up allocated out of the collector's sight and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _worker_main(
    cfg: Config,
    bound: list[tuple[ListenerConfig, socket.socket]],
    index: int,
    db_wait: float | None,
) -> int:
    set_sink(make_sink(cfg))
    _tune_gc()
    try:
        _run_loop(lambda: _serve_worker(cfg, bound, index, db_wait))
    finally:
        flush_events()
    return 0


PR_SET_PDEATHSIG = 1  # prctl(2) option: signal sent to us when the parent exits


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this worker when the supervisor dies (Linux only), so a
    killed supervisor never leaves workers holding the listening sockets."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _fork_worker(
    cfg: Config,
    bound: list[tuple[ListenerConfig, socket.socket]],
    index: int,
    db_wait: float | None,
) -> int:
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            code = _worker_main(cfg, bound, index, db_wait)
        except BaseException as exc:
            print(f"mailwarden worker {index}: {exc!r}", file=sys.stderr)
        finally:
            os._exit(code)
    return pid


class _StopRequested(Exception):
    """Raised by the supervisor's signal handler to break out of ``os.waitpid``.

    Python retries an interrupted system call when the handler returns (PEP 475), so a
    handler that only set a flag would leave the supervisor blocked in ``waitpid``.
    """


def _raise_stop(signum: int, _frame: object) -> None:
    raise _StopRequested(signum)


def _restart_wait(cfg: Config) -> float | None:
    """How long a restarted worker waits for its first open of the database: a server's
    answer for ``[database] start_wait`` seconds; the SQLite file until it is open."""
    return cfg.database.start_wait if cfg.database.is_server else None


def _supervise(
    cfg: Config, bound: list[tuple[ListenerConfig, socket.socket]], db_wait: float | None
) -> int:
    workers: dict[int, int] = {}
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        for i in range(cfg.gateway.workers):
            workers[_fork_worker(cfg, bound, i, db_wait)] = i
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            index = workers.pop(pid, None)
            if index is None:
                continue
            emit("gateway.worker_died", worker=index, pid=pid, status=status)
            time.sleep(WORKER_RESTART_DELAY)
            workers[_fork_worker(cfg, bound, index, _restart_wait(cfg))] = index
    except _StopRequested:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT
    while workers and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        workers.pop(pid, None)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return 0


DEGRADED_WARNING = (
    "  WARNING    starting without the database: relaying by registered servers, "
    "AUTH and database lookups answer 4xx until it is reachable (retried in the "
    "background)"
)


def open_database(cfg: Config) -> tuple[list[str], float | None]:
    """Create the schema once, before the workers start, and fail early on a database that
    cannot be used at all (``StoreError``); never wait longer than ``[database]
    start_wait`` for a server. Returns the banner lines and how long each worker waits for
    its own first open (``None``: until it is done; 0: not at all, the server did not
    answer, so the workers listen at once and connect in the background)."""
    settings = cfg.database
    if not settings.is_server:  # the SQLite file: local, no server to wait for
        db = open_store(cfg)
        db.close()
        return [f"  database   {db.label}"], None
    contact = first_contact(cfg, settings.start_wait)
    if contact.answer is Answer.ERROR:
        raise StoreError(contact.text)
    if contact.answer is Answer.OK:
        return [f"  database   {contact.text}"], None
    if contact.answer is Answer.UNAVAILABLE:  # down for now: start degraded, workers retry
        return [f"  database   UNAVAILABLE: {contact.text}", DEGRADED_WARNING], None
    line = (
        f"  database   NOT ANSWERING: {store_label(cfg)}: {contact.text}; still connecting "
        "in the background"
    )
    return [line, DEGRADED_WARNING], 0.0


def prepare(cfg: Config) -> tuple[list[str], float | None]:
    """Create the state directories, the schema and the TLS certificate; return notes for
    the banner and the workers' wait for the database (``open_database``)."""
    for path in (cfg.state_path, cfg.spool_path, cfg.mail_path, cfg.events_path.parent):
        path.mkdir(parents=True, exist_ok=True)
    notes, db_wait = open_database(cfg)
    if any(li.tls != "none" for li in cfg.listener):
        if ensure_certificate(cfg.cert_path, cfg.key_path, cfg.gateway.hostname):
            notes.append(f"  tls        generated a self-signed certificate: {cfg.cert_path}")
        else:
            notes.append(f"  tls        certificate {cfg.cert_path}")
    return notes, db_wait


def run_gateway(cfg: Config, *, banner: bool = True) -> int:
    """Start the gateway in the foreground; return the exit code when it stops."""
    notes, db_wait = prepare(cfg)
    bound = bind_listeners(cfg)
    set_sink(make_sink(cfg))
    Spool.adopt_orphans(cfg.spool_path, cfg.gateway.workers)
    emit(
        "gateway.start",
        version=__version__,
        workers=cfg.gateway.workers,
        listeners=[f"{li.name}={li.address}:{li.port}" for li in cfg.listener],
    )
    if banner:
        print(describe(cfg))
        for note in notes:
            print(note)
        print("  ready      (Ctrl-C or SIGTERM stops; 421 is sent to open sessions)", flush=True)
    if cfg.gateway.workers == 1:
        return _worker_main(cfg, bound, 0, db_wait)
    return _supervise(cfg, bound, db_wait)
