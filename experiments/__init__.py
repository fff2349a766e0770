"""The world a run simulates, and every door into it (Hydra runs, Flower apps, reports).

Importing this package switches off every network call Flower, Ray and Hugging Face
would make on their own (telemetry, update checks, usage stats, hub look-ups); the
switches are inherited by Ray's worker processes.
"""

import os

OFFLINE_SWITCHES = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}
#: Quiet, behaviour-neutral settings: Ray's notice about accelerator variables.
QUIET_SWITCHES = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
for _key, _value in {**OFFLINE_SWITCHES, **QUIET_SWITCHES}.items():
    os.environ.setdefault(_key, _value)
