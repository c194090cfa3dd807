"""One config path: every option is declared once in ServerArgs; the command line is generated from
it, validation is the same for `Engine(**kwargs)` and `launch_server --flag`, and the internal
configs are derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from radixlm.engine.model_runner import RunnerConfig
from radixlm.launch_server import make_parser, parse_args
from radixlm.sched.scheduler import SchedulerConfig
from radixlm.server_args import ServerArgs, cli_fields, derive_config


def test_every_option_has_a_flag_with_the_same_default():
    parser = make_parser()
    flags = {a.dest: a for a in parser._actions}
    for name, f in cli_fields().items():
        assert name in flags, f"--{name.replace('_', '-')} missing"
        assert flags[name].help, name
        if name != "model_path":
            assert flags[name].default == f.default, name
    assert "show_progress" not in flags  # set by the server itself, not a flag
    args = parse_args(["--model-path", "m"])
    assert args == ServerArgs(model_path="m", show_progress=True)


@pytest.mark.parametrize("field,value,flag", [
    ("max_n", 0, "0"), ("page_size", 0, "0"), ("port", 70000, "70000"), ("mem_fraction_static", 1.5, "1.5"),
    ("schedule_conservativeness", 0.0, "0"), ("grammar_compile_timeout", -1.0, "-1"),
    ("schedule_policy", "sjf", "sjf"), ("attention_backend", "flash", "flash"), ("dtype", "int3", "int3"),
    ("tool_call_parser", "mistral", "mistral"), ("max_top_logprobs_num", -1, "-1"),
])
def test_engine_and_cli_reject_the_same_values(field, value, flag, capsys):
    with pytest.raises(ValueError, match=field):
        ServerArgs(model_path="m", **{field: value})
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", f"--{field.replace('_', '-')}", flag])
    err = capsys.readouterr().err
    assert field.replace("_", "-") in err or field in err, err


def test_sglang_spellings():
    a = parse_args(["--model-path", "m", "--chunked-prefill-size", "-1", "--log-level", "warning",
                    "--enable-mixed-chunk", "--max-running-requests", "7"])
    assert a.resolved_chunked_prefill_size is None and a.enable_mixed_chunk and a.max_running_requests == 7
    assert ServerArgs(model_path="m", log_level="WARNING").log_level == "warning"


def test_internal_configs_are_derived_and_share_defaults():
    a = ServerArgs(model_path="m", max_prefill_tokens=123, schedule_policy="fcfs", page_size=4,
                   disable_jump_forward=True)
    sc = derive_config(SchedulerConfig, a, max_running_requests=a.resolved_max_running_requests,
                       enable_jump_forward=not a.disable_jump_forward)
    assert (sc.max_prefill_tokens, sc.schedule_policy, sc.enable_jump_forward) == (123, "fcfs", False)
    rc = derive_config(RunnerConfig, a, device="cpu", max_running_requests=a.resolved_max_running_requests)
    assert rc.page_size == 4 and rc.max_running_requests == 256
    base = ServerArgs(model_path="m")
    for cfg in (SchedulerConfig(), RunnerConfig()):
        for f in dataclasses.fields(cfg):
            if f.name in ServerArgs.__dataclass_fields__ and f.name not in ("device", "max_running_requests") + \
                    DEVICE_DEPENDENT:
                assert getattr(cfg, f.name) == getattr(base, f.name), f.name
        assert cfg.max_running_requests == base.resolved_max_running_requests
    gpu = ServerArgs(model_path="m", device="cuda")  # the scheduler's own defaults are the GPU ones
    sc = SchedulerConfig()
    assert (sc.chunked_prefill_size, sc.enable_mixed_chunk, sc.enable_overlap) == (
        gpu.resolved_chunked_prefill_size, gpu.resolved_enable_mixed_chunk, False)


DEVICE_DEPENDENT = ("chunked_prefill_size", "enable_mixed_chunk")  # resolved per device (test_cpu_serving.py)


def test_grammar_flags_reach_the_schedulers_backend(path):
    import radixlm

    with radixlm.Engine(model_path=path, log_level="warning", grammar_compile_timeout=7.5,
                        grammar_cache_size=3) as eng:
        backend = eng.loop.call(lambda s: s.grammar_backend())
        assert (backend.compile_timeout, backend.cache_size) == (7.5, 3)


def test_engine_refuses_data_parallelism(path):
    import radixlm

    with pytest.raises(ValueError, match="dp_size"):
        radixlm.Engine(model_path=path, dp_size=2)
