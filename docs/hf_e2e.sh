#!/usr/bin/env bash
# End-to-end Hugging Face round trip through the CLI (a script, not a test: ~5 min on 2 CPU cores):
# BPE data -> tiny random HF Llama -> convert -> upcycle to 8 experts -> train 20 steps at EP=2 ->
# export as Mixtral -> load in transformers -> generate; then LoRA trained on the converted Llama ->
# PEFT's format -> PEFT on the HF base gives moe_sys's logits.   Usage: docs/hf_e2e.sh [WORK_DIR]
set -euo pipefail
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK" && cd "$WORK"
PY=${PYTHON:-python}
MS="$PY -m moe_sys.cli"
STDLIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
# 1. data: BPE trained on some stdlib modules
mkdir -p text && for f in "$STDLIB"/{json,email,http}/*.py; do cp "$f" "text/$(basename "$(dirname "$f")")_$(basename "$f").txt"; done
$MS prepare-data text --output data/code --train-tokenizer 512
# 2. a tiny random HF Llama with that vocabulary
$PY - <<'PY'
import sys
try:
    import torchvision  # noqa: F401
except Exception:  # PyPI's CUDA torchvision beside a CPU torch: hide it (tests/torchvision_stub.py)
    sys.modules["torchvision"] = None
import torch, transformers as T
torch.manual_seed(0)
c = T.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=128)
T.AutoModelForCausalLM.from_config(c).save_pretrained("hf_llama")
PY
cp data/code.tokenizer.json hf_llama/tokenizer.json
$MS convert from-hf hf_llama --out llama_ms
# 3. upcycle to 8 experts
$MS merge upcycle --base llama_ms/model.safetensors --config llama_ms/config.yaml --set moe.enabled=true \
  --set moe.num_experts=8 --set moe.top_k=2 --set moe.router.normalize=true --out moe8.safetensors
# 4. train 20 steps at EP=2 on the BPE data
$MS train llama_ms/config.yaml --set moe.enabled=true --set moe.num_experts=8 --set moe.top_k=2 \
  --set moe.router.normalize=true --set train.init_from=$PWD/moe8.safetensors --set "data.domains=[{name: code, path: $PWD/data/code}]" \
  --set train.steps=20 --set train.warmup_steps=2 --set train.eval_every=10 --set train.eval_batches=1 --set train.micro_batch_size=4 \
  --set data.seq_len=64 --set parallel.ep_size=2 --set parallel.procs=2 --set logging.run_dir=$PWD/run --set logging.progress_bar=false \
  --set checkpoint.every=0 --set logging.tensorboard=false
# 5. export as Mixtral, load in transformers, generate
$MS convert to-hf run --out hf_mixtral
$PY - <<'PY'
import sys
try:
    import torchvision  # noqa: F401
except Exception:  # PyPI's CUDA torchvision beside a CPU torch: hide it (tests/torchvision_stub.py)
    sys.modules["torchvision"] = None
import torch, transformers as T
m = T.AutoModelForCausalLM.from_pretrained("hf_mixtral")
print("loaded", type(m).__name__)
PY
$MS generate hf_mixtral --prompt "def load(" --max-new-tokens 20 --temperature 0
$MS generate run --prompt "def load(" --max-new-tokens 20 --temperature 0
# 6. LoRA trained on the converted (dense) Llama, exported to PEFT, loaded by PEFT on the HF base
$MS train llama_ms/config.yaml --set 'adapters.modules=[{type: lora, name: a, rank: 4, targets: ["layers.*.attn.qkv", "layers.*.ffn.up"]}]' \
  --set "data.domains=[{name: code, path: $PWD/data/code}]" --set train.steps=20 --set train.warmup_steps=2 --set train.lr=0.01 \
  --set train.eval_every=10 --set train.eval_batches=1 --set train.micro_batch_size=4 --set data.seq_len=64 \
  --set parallel.procs=2 --set logging.run_dir=$PWD/run_lora --set logging.progress_bar=false --set checkpoint.every=0 \
  --set logging.tensorboard=false
$MS convert lora-to-peft run_lora/adapters --base llama_ms --out peft_lora
$PY - <<'PY'
import sys
try:
    import torchvision  # noqa: F401
except Exception:  # PyPI's CUDA torchvision beside a CPU torch: hide it (tests/torchvision_stub.py)
    sys.modules["torchvision"] = None
import torch, peft, transformers as T
from moe_sys.adapters.inject import inject
from moe_sys.config import load_config
from moe_sys.config.adapters import AdaptersConfig
from moe_sys.models.transformer import TransformerLM
from moe_sys.weights.io import load_model_weights
cfg = load_config("llama_ms/config.yaml")
ours = TransformerLM(cfg.model, cfg.moe, num_domains=1)
load_model_weights(ours, "llama_ms/model.safetensors")
inject(ours, AdaptersConfig(load_from="run_lora/adapters"), ["code"])
tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    expected = ours.eval()(tokens).logits_BSV
    base = T.AutoModelForCausalLM.from_pretrained("hf_llama").eval()
    with_peft = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained("hf_llama"), "peft_lora").eval()
    diff, moved = (with_peft(tokens).logits - expected).abs().max().item(), (base(tokens).logits - expected).abs().max().item()
print(f"PEFT vs moe_sys logits: max abs diff {diff:.2e} (the trained LoRA moved them by {moved:.2e})")
assert diff <= 1e-4 and moved > 1e-3
PY
echo "all steps passed in $WORK"
