"""keep_freed_host_memory: glibc keeps freed blocks instead of unmapping them (CPU decode speed);
it is applied by the CPU model runner, can be turned off, and does not change outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest

SNIPPET = """
import sys
from radixlm.engine.host_memory import keep_freed_host_memory
print(keep_freed_host_memory(), keep_freed_host_memory())
"""


def run_snippet(env_value=None):
    import os

    env = dict(os.environ)
    env.pop("RADIXLM_KEEP_FREED_HOST_MEMORY", None)
    if env_value is not None:
        env["RADIXLM_KEEP_FREED_HOST_MEMORY"] = env_value
    return subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applied_once_and_can_be_turned_off():
    assert run_snippet() == ["True", "True"]
    assert run_snippet("0") == ["False", "False"]


def test_outputs_do_not_depend_on_it(path):
    """The same greedy tokens with the setting on (this process, via the CPU runner) and off (a
    subprocess with RADIXLM_KEEP_FREED_HOST_MEMORY=0)."""
    import json
    import os

    code = ("import json, radixlm\n"
            f"e = radixlm.Engine(model_path={path!r}, log_level='warning')\n"
            "print(json.dumps([o['output_ids'] for o in e.generate(input_ids=[[5, 6, 7], [9] * 40], "
            "sampling_params={'temperature': 0, 'max_new_tokens': 8, 'ignore_eos': True})]))\n"
            "e.shutdown()\n")
    outs = []
    for value in ("1", "0"):
        env = {**os.environ, "RADIXLM_KEEP_FREED_HOST_MEMORY": value}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] and len(outs[0][1]) == 8
