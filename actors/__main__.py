"""`python -m actors`: a one-off run of WORKER_JOB with WORKER_PAYLOAD."""

from __future__ import annotations

from actors.oneoff import main

raise SystemExit(main())
