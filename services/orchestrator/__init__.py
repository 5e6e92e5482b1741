"""The orchestrator: durable agent-team runs for one tenant at a time.

Modules, from the inside out:
  team.py        team definitions and their validation
  steps.py       the durable entries of a run; history.py replays them into the run's state
  engine.py      the agent loop (model call / tool call / hand-off, one appended step at a time)
  http_tools.py  allowlisted HTTP tools with secrets injected just in time; ratelimit.py
  canary.py      per-tenant canary markers and the output check
  scheduler.py   fair admission under per-tenant limits; dispatcher.py leases and executes runs
  store.py       teams, runs, recorded steps and the run queue (SQLAlchemy; migrations/)
  operations.py  what each RPC does; servicer.py maps it to and from protos; server.py wires it
  peers.py       where the peers listen, and the engine's ports over gRPC (state, inference, identity)
"""
