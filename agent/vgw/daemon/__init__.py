"""The agent daemon's parts (`vgw run`); :class:`vgw.daemon.agent.Agent` builds and wires them.

Each module is one job, and its docstring says which thread owns it and which lock it takes:

    statedir    AgentLock (one `vgw run` per state dir) and open_state (shared with the CLI)
    signals     DaemonSignals: the one place SIGTERM, SIGINT and SIGHUP handlers are installed (main thread)
    guard       PipelineGuard: the pipeline, recipients and frame filters behind the agent lock
    collector   Collector: thread vgw-collector, owns the CAN source
    health      Health: collector/poller/uplink/writer liveness, bus silence (main loop)
    status      StatusView: status.json and the retained public status (main loop; reads from any thread)
    supervisor  Supervisor: the main loop (consent intake and inbox, expiry, retention, erasures, quota
                audits, status file, clock floor, reload, watchdog)

The batch writer (vgw.daemon.writer), the shared counters (vgw.daemon.counters) and sd_notify (vgw.daemon.sdnotify)
are daemon parts too. Nothing is imported here: `vgw` installs the signal handlers before anything heavy loads.
"""
