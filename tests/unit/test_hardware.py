"""searche1_ray.hardware: "auto" dtypes pick bf16 only where it is fast (GPU, AMX / AVX512-BF16)."""

from searche1_ray.config import load_config
from searche1_ray.hardware import cpu_flags, cpu_has_native_bf16, resolve_bf16, resolve_dtype
from searche1_ray.training.deepspeed_config import deepspeed_config

AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})            # e.g. the AMD EPYC seen here
AMX = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}   # a Sapphire Rapids Xeon


def test_auto_is_bf16_only_with_native_bf16_or_a_gpu():
    assert not cpu_has_native_bf16(AVX2) and cpu_has_native_bf16(AMX)
    assert cpu_has_native_bf16(AVX2 | {"avx512_bf16"})
    assert resolve_dtype("auto", flags=AVX2) == "float32"
    assert resolve_dtype("auto", flags=AMX) == "bfloat16"
    assert resolve_dtype("auto", on_gpu=True, flags=AVX2) == "bfloat16"
    assert resolve_bf16("auto", flags=AVX2) is False and resolve_bf16("auto", flags=AMX) is True
    assert resolve_bf16("auto", on_gpu=True, flags=AVX2) is True


def test_explicit_choices_are_kept():
    for name in ("bfloat16", "float32", "float16"):
        assert resolve_dtype(name, flags=AVX2) == resolve_dtype(name, flags=AMX) == name
    assert resolve_bf16(True, flags=AVX2) is True and resolve_bf16(False, flags=AMX) is False


def test_this_machine_and_the_config_defaults():
    flags = cpu_flags()
    assert isinstance(flags, frozenset)
    cfg = load_config(None)
    assert cfg.model.dtype == "auto" and cfg.train.bf16 == "auto"
    want = resolve_bf16("auto")
    assert deepspeed_config(cfg.train, grad_clip=1.0, world_size=2)["bf16"]["enabled"] is want
    assert want == cpu_has_native_bf16(flags)
    assert load_config(None, ["train.bf16=true"]).train.bf16 is True
