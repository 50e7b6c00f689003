"""LoRA and QLoRA: parity with PEFT (logits, adapter gradients, adapter files both ways), the
base untouched by training, pi_ref as the base model, checkpoints of the adapters only, a
killed LoRA run resuming exactly, quantized bases close to bfloat16's."""

import dataclasses
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.special import ndtri
from safetensors.numpy import load_file

from grpo_jax import checkpoint as checkpoint_lib
from grpo_jax import completion_logps as logps_lib
from grpo_jax import config as config_lib
from grpo_jax import main as main_lib
from grpo_jax import models
from grpo_jax import rejection_sample
from grpo_jax import sft
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError
from grpo_jax.models import lora as lora_lib
from grpo_jax.models import peft_io
from grpo_jax.models import quantize
from tests import tiny_hf
from tests.test_models import _batch as batch
from tests.test_models import _max_diff_on_valid as max_diff_on_valid
from tests.test_reliability import resumed_steps, start_run, wait_for_step
from tests.test_train import tiny_config, train_records

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = {"qwen2": ("qwen2", {}), "llama": ("llama", dict(tie=True))}
RANK, ALPHA = 4, 8.0
PARITY_ATOL = 2e-4  # float32 logits, as the model parity tests
GRAD_RTOL = 1e-5  # of each adapter tensor's largest gradient entry


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """name -> (HF checkpoint dir, PEFT adapter dir saved by PEFT with random adapter weights)."""
  made = {}

  def get(name):
    if name not in made:
      family, kwargs = FAMILIES[name]
      root = tmp_path_factory.mktemp(name)
      ckpt = tiny_hf.make_checkpoint(family, root / "base", **kwargs)
      model = peft_model(ckpt)
      torch.manual_seed(1)
      with torch.no_grad():
        for param_name, p in model.named_parameters():
          if "lora_" in param_name:
            p.copy_(0.1 * torch.randn_like(p))
      model.save_pretrained(root / "adapter")
      made[name] = ckpt, root / "adapter"
    return made[name]

  return get


def peft_model(ckpt, adapter_dir=None):
  """transformers' model of ckpt with a PEFT LoRA (fresh, or loaded from adapter_dir)."""
  base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
  if adapter_dir is not None:
    return peft.PeftModel.from_pretrained(base, adapter_dir)
  return peft.get_peft_model(base, peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=list(models.LoRASpec(1, 1.0).targets),
      task_type="CAUSAL_LM"))


def torch_logits(model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(positions)).logits


# -- parity with PEFT --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_peft_adapter_loads_and_gives_peft_logits(cases, name):
  ckpt, adapter_dir = cases(name)
  model = models.load_peft_adapter(models.from_pretrained(ckpt), adapter_dir)
  assert model.config.lora == models.LoRASpec(RANK, ALPHA, base_dtype="float32")
  tokens, mask = batch(model.config.vocab_size)
  ours = model(jnp.asarray(tokens), jnp.asarray(mask))
  with torch.no_grad():
    theirs = torch_logits(peft_model(ckpt, adapter_dir), tokens, mask).numpy()
  diff = max_diff_on_valid(ours, theirs, mask)
  base = models.from_pretrained(ckpt)(jnp.asarray(tokens), jnp.asarray(mask))
  print(f"LoRA parity {name}: max |diff| = {diff:.2e}")
  assert diff < PARITY_ATOL
  assert max_diff_on_valid(base, theirs, mask) > 1.0  # the adapters change the logits


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_adapter_gradients_match_torch_autograd(cases, name, tmp_path):
  """d/d(A, B) of sum_t w_t log p(x_t+1 | x_<=t) (ours in float32) against PyTorch's autograd
  through PEFT in float64."""
  ckpt, adapter_dir = cases(name)
  model = models.load_peft_adapter(models.from_pretrained(ckpt), adapter_dir)
  tokens, mask = batch(model.config.vocab_size)
  weights = (np.random.RandomState(2).randn(*tokens.shape) * mask)[:, :-1].astype(np.float32)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)

  def loss(adapters):
    logits = nnx.merge(graphdef, adapters, base)(jnp.asarray(tokens), jnp.asarray(mask))[:, :-1]
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(logps * weights)

  nnx.update(model, jax.jit(jax.grad(loss))(adapters))
  peft_io.save_peft_adapter(model, tmp_path)  # the gradients, under PEFT's names and layout
  ours = load_file(tmp_path / peft_io.WEIGHTS_FILE)

  theirs_model = peft_model(ckpt, adapter_dir).to(torch.float64)  # float32 rounding apart
  for p in theirs_model.parameters():
    p.requires_grad_(True)  # PeftModel.from_pretrained loads for inference
  logps = torch.log_softmax(torch_logits(theirs_model, tokens, mask)[:, :-1], -1).gather(
      -1, torch.tensor(tokens[:, 1:, None], dtype=torch.long))[..., 0]
  (logps * torch.tensor(weights, dtype=torch.float64)).sum().backward()
  theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in theirs_model.named_parameters()
            if "lora_" in n}
  assert set(ours) == set(theirs) and len(ours) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
  worst = max(float(np.abs(ours[n] - theirs[n]).max() / np.abs(theirs[n]).max()) for n in ours)
  print(f"adapter gradients {name}: max |diff| / max |grad| per tensor = {worst:.1e}")
  assert worst < GRAD_RTOL


def test_our_adapter_export_loads_in_peft_with_identical_logits(cases, tmp_path):
  ckpt, adapter_dir = cases("qwen2")
  model = models.load_peft_adapter(models.from_pretrained(ckpt), adapter_dir)
  models.save_peft_adapter(model, tmp_path / "ours")
  config = json.loads((tmp_path / "ours" / peft_io.CONFIG_FILE).read_text())
  assert (config["r"], config["lora_alpha"], config["peft_type"]) == (RANK, ALPHA, "LORA")
  tokens, mask = batch(model.config.vocab_size)
  with torch.no_grad():
    original = torch_logits(peft_model(ckpt, adapter_dir), tokens, mask).numpy()
    exported = torch_logits(peft_model(ckpt, tmp_path / "ours"), tokens, mask).numpy()
  np.testing.assert_array_equal(exported, original)


def test_merged_export_loads_in_transformers_with_peft_logits(cases, tmp_path):
  ckpt, adapter_dir = cases("llama")
  model = models.load_peft_adapter(models.from_pretrained(ckpt), adapter_dir)
  models.save_pretrained(model, tmp_path)  # merged: W + scale A B
  tokens, mask = batch(model.config.vocab_size)
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  with torch.no_grad():
    theirs = torch_logits(peft_model(ckpt, adapter_dir), tokens, mask).numpy()
    diff = max_diff_on_valid(torch_logits(merged, tokens, mask).numpy(), theirs, mask)
  print(f"merged export vs PEFT: max |diff| = {diff:.2e}")
  assert diff < PARITY_ATOL


@pytest.mark.parametrize("problem, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules"),
    ({"peft_type": "IA3"}, "only LORA"),
])
def test_unsupported_peft_adapters_are_one_line_user_errors(cases, tmp_path, problem, message):
  ckpt, adapter_dir = cases("qwen2")
  config = json.loads((adapter_dir / peft_io.CONFIG_FILE).read_text())
  (tmp_path / peft_io.CONFIG_FILE).write_text(json.dumps({**config, **problem}))
  with pytest.raises(UserError) as e:
    models.load_peft_adapter(models.from_pretrained(ckpt), tmp_path)
  assert message in str(e.value) and "\n" not in str(e.value)


# -- the base and the reference ----------------------------------------------------------------


def test_fresh_adapters_leave_the_base_outputs_unchanged(cases):
  ckpt, _ = cases("qwen2")
  base = models.from_pretrained(ckpt)
  model = models.from_pretrained(ckpt, lora=models.LoRASpec(RANK, ALPHA), seed=3)
  tokens, mask = batch(base.config.vocab_size)
  np.testing.assert_array_equal(model(jnp.asarray(tokens), jnp.asarray(mask)),
                                base(jnp.asarray(tokens), jnp.asarray(mask)))
  adapters = nnx.state(model, nnx.LoRAParam)
  assert all(not np.any(np.asarray(v)) for k, v in nnx.to_flat_state(adapters) if k[-1] == "b")
  assert all(np.any(np.asarray(v)) for k, v in nnx.to_flat_state(adapters) if k[-1] == "a")


def test_reference_log_probs_with_adapters_off_equal_the_base_forward_exactly(cases):
  ckpt, adapter_dir = cases("qwen2")
  model = models.load_peft_adapter(models.from_pretrained(ckpt), adapter_dir)
  tokens, mask = batch(model.config.vocab_size, b=4, t=10, pads=(0, 2, 5, 0))
  prompts, prompt_mask = tokens[::2, :6], mask[::2, :6]
  completion, completion_mask = tokens[:, 6:], np.ones_like(tokens[:, 6:])

  @jax.jit
  def logps(params, ref_params):
    graphdef, ref = lora_lib.reference(nnx.split(model)[0], params, ref_params)
    return logps_lib.completion_logps(graphdef, ref, prompts, prompt_mask, completion,
                                      completion_mask, 1.0)

  base_graphdef, base_params = nnx.split(models.from_pretrained(ckpt))
  want = jax.jit(logps_lib.completion_logps, static_argnums=(0, 6))(
      base_graphdef, base_params, prompts, prompt_mask, completion, completion_mask, 1.0)
  np.testing.assert_array_equal(logps(nnx.state(model), None), want)
  # With iterative resets pi_ref has adapters of its own, zero until the first reset.
  zeros = lora_lib.initial_reference(nnx.state(model), beta=0.04, ref_reset_every=2)
  np.testing.assert_allclose(logps(nnx.state(model), zeros), want, atol=1e-6)


def lora_config(**overrides):
  """tiny_config with rank-4 adapters, a KL term and a reward that varies within groups."""
  return tiny_config(**{"model.lora.rank": RANK, "model.lora.alpha": ALPHA, "grpo.beta": 0.04,
                        "rewards": "tests.test_mesh:digit_share", "train.learning_rate": 1e-2,
                        "eval.num_prompts": 0, **overrides})


def test_grpo_steps_change_only_the_adapters_and_checkpoint_only_them(tmp_path):
  cfg = config_lib.freeze(lora_config(**{"grpo.ref_reset_every": 2, "train.num_steps": 3}))
  trainer = main_lib.Trainer(cfg, str(tmp_path))
  before = jax.device_get(trainer.state.params)
  adapters = lora_lib.split_trainable(before)[0]
  num_adapter = sum(x.size for x in jax.tree.leaves(adapters))
  moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.size > 1]
  assert sum(x.size for x in moments) == 2 * num_adapter  # AdamW's moments cover the adapters
  trainer.run()
  after = jax.device_get(trainer.state.params)
  frozen = lambda p: jax.tree.leaves(lora_lib.split_trainable(p)[1])
  for x, y in zip(frozen(before), frozen(after), strict=True):
    assert x.tobytes() == y.tobytes()  # the base's bytes, unchanged
  b = lambda p: [v for k, v in nnx.to_flat_state(lora_lib.split_trainable(p)[0]) if k[-1] == "b"]
  assert all(np.any(np.asarray(v)) for v in b(after)) and not any(np.any(v) for v in b(before))
  assert all(r["rl/reward_std"] > 0 for r in train_records(str(tmp_path)))
  # pi_ref holds adapters only, reset to the policy's (B no longer zero) after step 2.
  ref = jax.device_get(trainer.state.ref_params)
  assert jax.tree.structure(ref) == jax.tree.structure(lora_lib.split_trainable(after)[0])
  assert all(np.any(np.asarray(v)) for v in b(ref))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", keep=3)
  saved = ckpt._manager.item_metadata(3)["state"].tree  # pylint: disable=protected-access
  ckpt.close()
  params = checkpoint_lib._shapes(saved["params"])  # pylint: disable=protected-access
  assert params and all(any(p.endswith("_lora") for p in k) for k in params), sorted(params)
  assert (tmp_path / "adapter" / peft_io.WEIGHTS_FILE).is_file()


def test_a_lora_run_with_remat_has_the_metrics_of_one_without(tmp_path):
  """Rematerialised blocks over a frozen base (the accelerator configs' setting): the step
  compiles (nnx.remat failed on the base closed over by the adapters' gradient) and computes
  what it computes without remat."""
  records = []
  for remat in (False, True):
    cfg = lora_config(**{"train.num_steps": 2, "model.remat": remat, "model.lora.dropout": 0.1})
    main_lib.run(cfg, str(tmp_path / str(remat)))
    records.append(train_records(str(tmp_path / str(remat))))
  for got, want in zip(records[1], records[0], strict=True):
    keys = [k for k in want if not k.startswith("perf/")]
    assert [got[k] for k in keys] == pytest.approx([want[k] for k in keys], rel=1e-5, abs=1e-7)


def test_a_killed_lora_run_resumes_to_the_uninterrupted_metrics(tmp_path):
  cfg = lambda: lora_config(**{"train.num_steps": 6, "train.lr_schedule": "constant",
                               "checkpoint.every_steps": 1, "model.lora.dropout": 0.1,
                               "rewards": "tests.test_reliability:digit_reward"})
  straight, workdir = tmp_path / "straight", tmp_path / "interrupted"
  out, _ = start_run(straight, cfg()).communicate(timeout=300)
  proc = start_run(workdir, cfg())
  wait_for_step(workdir, proc, 3)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  out, _ = start_run(workdir, cfg()).communicate(timeout=300)
  assert resumed_steps(out), out
  records = train_records(workdir)
  assert [r["step"] for r in records] == list(range(1, 7))
  for got, want in zip(records, train_records(straight)):
    for key in ("train/loss", "train/grad_norm", "rl/reward_mean", "rl/kl"):
      assert got[key] == want[key], (got["step"], key)


def test_a_warm_start_of_the_weights_makes_the_base_and_resumes_with_it(tmp_path):
  """model.lora.sft_trains="weights": SFT trains the base, GRPO then only the adapters over it;
  the checkpoints hold that base, so a resumed run gives the metrics of a straight one."""
  cfg = lambda steps: config_lib.freeze(lora_config(**{
      "sft.num_steps": 3, "sft.batch_size": 4, "sft.max_len": 64, "train.num_steps": steps,
      "model.lora.sft_trains": "weights", "train.lr_schedule": "constant"}))
  straight = main_lib.Trainer(cfg(3), str(tmp_path / "straight"))
  initial = jax.device_get(lora_lib.split_trainable(straight.state.params)[1])
  straight.run()
  final = jax.device_get(lora_lib.split_trainable(straight.state.params)[1])
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(initial),
                                                     jax.tree.leaves(final)))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "straight" / "checkpoints", keep=3)
  base_after_sft, _ = ckpt.restore(straight.checkpointed(), step=0)
  ckpt.close()
  for x, y in zip(jax.tree.leaves(lora_lib.split_trainable(base_after_sft.params)[1]),
                  jax.tree.leaves(final), strict=True):
    np.testing.assert_array_equal(x, y)  # GRPO left the SFT base as it was
  main_lib.Trainer(cfg(1), str(tmp_path / "resumed")).run()
  main_lib.Trainer(cfg(3), str(tmp_path / "resumed")).run()
  for got, want in zip(train_records(tmp_path / "resumed"), train_records(tmp_path / "straight"),
                       strict=True):
    for key in ("train/loss", "train/grad_norm", "rl/reward_mean", "rl/kl"):
      assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)


def test_init_from_starts_from_the_adapter_dir_and_must_match_its_shape(cases, tmp_path):
  ckpt, adapter_dir = cases("qwen2")
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                          for i in range(12)))
  over = {"model.path": str(ckpt), "data.source": f"jsonl:{data}", "data.num_eval_rows": 2,
          "model.lora.init_from": str(adapter_dir), "grpo.beta": 0.0}
  from grpo_jax import builder  # pylint: disable=g-import-not-at-top
  _, params = builder.build_run(config_lib.freeze(lora_config(**over)))
  want = nnx.state(models.load_peft_adapter(models.from_pretrained(ckpt), adapter_dir),
                   nnx.LoRAParam)
  for x, y in zip(jax.tree.leaves(lora_lib.split_trainable(params)[0]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(UserError) as e:
    builder.build_run(config_lib.freeze(lora_config(**over, **{"model.lora.rank": 8})))
  assert "rank 4" in str(e.value) and "model.lora.rank" in str(e.value)


def test_sft_and_rejection_sampling_take_the_lora_keys(tmp_path):
  cfg = lora_config(**{"sft.num_steps": 3, "sft.batch_size": 4, "sft.max_len": 64,
                       "sft.learning_rate": 1e-2})
  sft.run(cfg, str(tmp_path / "sft"))
  adapter_dir = tmp_path / "sft" / "adapter"
  assert (tmp_path / "sft" / "hf" / "config.json").is_file()
  trained = load_file(adapter_dir / peft_io.WEIGHTS_FILE)
  assert all(np.any(v) for k, v in trained.items() if "lora_B" in k)
  # The adapters SFT trained, over the demo base they were trained on (same seed).
  summary = rejection_sample.run(
      lora_config(**{"model.lora.init_from": str(adapter_dir)}), str(tmp_path / "kept.jsonl"),
      k=2, min_reward=0.0, max_per_prompt=1, num_prompts=2)
  assert summary["samples"] == 4


@pytest.mark.parametrize("overrides, needles", [
    ({"model.lora.targets": "q_proj,embed"}, ["model.lora.targets", "q_proj,k_proj"]),
    ({"model.lora.rank": 0, "model.lora.base_dtype": "nf4"}, ["model.lora.base_dtype", "rank > 0"]),
    ({"model.lora.rank": 0, "model.lora.init_from": "/x"}, ["model.lora.init_from", "rank > 0"]),
    ({"model.lora.dropout": 1.0}, ["model.lora.dropout", "< 1"]),
])
def test_bad_lora_keys_are_one_line_user_errors(overrides, needles):
  with pytest.raises(UserError) as e:
    config_lib.freeze(lora_config(**overrides))
  assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)


def test_dropout_only_with_a_key_and_at_its_rate():
  spec = models.LoRASpec(rank=2, alpha=2.0, dropout=0.25)
  adapter = lora_lib.LoRA((64,), (8,), ("embed", "mlp"), spec, jnp.float32, rngs=nnx.Rngs(0))
  adapter.b.set_value(jnp.ones((2, 8)))
  x = jnp.ones((4096, 64))
  np.testing.assert_array_equal(adapter(x), adapter(x))
  dropped = adapter(jnp.eye(64), jax.random.key(0))  # row i: the adapter of input i, or 0
  rate = float(jnp.mean(jnp.all(dropped == 0, axis=-1)))
  assert 0.1 < rate < 0.4, rate
  assert not np.array_equal(adapter(x, jax.random.key(1)), adapter(x, jax.random.key(2)))


# -- QLoRA -------------------------------------------------------------------------------------


def test_the_nf4_code_book_is_the_normal_quantiles_of_qlora():
  """QLoRA's construction: 8 positive and 7 negative N(0,1) quantiles (offset 0.9677083),
  and 0, scaled to [-1, 1]."""
  offset = 0.9677083
  positive = ndtri(jnp.linspace(offset, 0.5, 9)[:-1])
  negative = -ndtri(jnp.linspace(offset, 0.5, 8)[:-1])
  values = jnp.sort(jnp.concatenate([positive, jnp.zeros(1), negative]))
  np.testing.assert_allclose(quantize.NF4_CODE, values / values.max(), atol=1e-6)


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_quantization_error_is_within_half_a_code_step(kind):
  w = jax.random.normal(jax.random.key(0), (256, 48)) * jnp.linspace(0.1, 3.0, 48)
  codes, scales = quantize.quantize(w, kind)
  back = quantize.dequantize(codes, scales, kind, jnp.float32)
  assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
  assert codes.nbytes == (w.size if kind == "int8" else w.size // 2)
  if kind == "int8":
    bound = scales[None, :] / 127 / 2  # half of one of the 255 steps of a column
  else:
    half_gap = float(np.max(np.diff(quantize.NF4_CODE))) / 2
    bound = jnp.repeat(scales, quantize.NF4_BLOCK, axis=0) * half_gap
  assert bool(jnp.all(jnp.abs(back - w) <= bound * (1 + 1e-5)))
  # Each column (int8) or block (nf4) keeps its largest value exactly.
  np.testing.assert_allclose(jnp.max(jnp.abs(back), axis=0), jnp.max(jnp.abs(w), axis=0),
                             rtol=1e-6)


# The tiny random Qwen2 (weights ~N(0, 0.2^2), logits of mean |l| 1.3) amplifies weight
# errors: its bfloat16 base is itself 0.2 (max) / 0.017 (mean) from its float32 one. Measured
# here: int8 max 0.22, mean 0.033; nf4 max 3.7, mean 0.47 (relative weight errors 0.8% and 9%
# RMS on Gaussian weights, bfloat16 0.17%).
QUANT_BOUNDS = {"int8": (0.5, 0.08), "nf4": (8.0, 1.0)}  # (max, mean) |diff|


@pytest.mark.parametrize("kind", quantize.KINDS)
def test_quantized_base_logits_stay_close_to_the_bfloat16_base(cases, kind):
  ckpt, adapter_dir = cases("qwen2")

  def logits(base_dtype):
    spec = models.LoRASpec(RANK, ALPHA, base_dtype=base_dtype)
    model = models.from_pretrained(ckpt, lora=spec)
    peft_io.read_adapters(model, adapter_dir)
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))

  tokens, mask = batch(models.from_pretrained(ckpt).config.vocab_size)
  want = logits("bfloat16")
  diff = np.abs(logits(kind) - want)[mask == 1]
  print(f"{kind} vs bfloat16 base: max |diff| {diff.max():.3f}, mean {diff.mean():.4f}, "
        f"mean |logit| {np.abs(want[mask == 1]).mean():.2f}")
  max_bound, mean_bound = QUANT_BOUNDS[kind]
  assert diff.max() < max_bound and diff.mean() < mean_bound


def test_a_quantized_base_trains_and_stays_quantized(tmp_path):
  cfg = config_lib.freeze(lora_config(**{"model.lora.base_dtype": "nf4", "train.num_steps": 2,
                                         "model.demo.hidden_size": 64,
                                         "model.demo.intermediate_size": 128}))
  trainer = main_lib.Trainer(cfg, str(tmp_path))
  codes = lambda: [x for x in jax.tree.leaves(trainer.state.params) if x.dtype == jnp.uint8]
  before = [np.asarray(x) for x in codes()]
  assert len(before) == 7  # the seven projections of the one layer
  trainer.run()
  for x, y in zip(before, codes(), strict=True):
    np.testing.assert_array_equal(x, y)
  assert all(np.isfinite(r["train/loss"]) for r in train_records(str(tmp_path)))


def test_the_accelerator_and_demo_configs_have_lora_variants():
  from configs import demo, gpu, tpu_v4, tpu_v5e  # pylint: disable=g-import-not-at-top
  for module in (tpu_v4, tpu_v5e, gpu):
    cfg = module.get_config("7b,lora,model=/m,data=/d.jsonl")
    lora = cfg.model.lora
    assert (lora.rank, lora.alpha, lora.base_dtype) == (64, 64.0, "bfloat16"), module.__name__
    assert module.get_config("7b,model=/m,data=/d.jsonl").model.lora.rank == 0
  cfg = config_lib.freeze(demo.get_config("lora"), num_devices=1)
  assert cfg.model.lora.rank == 16 and cfg.model.lora.sft_trains == "weights"
  assert cfg.train.learning_rate != demo.get_config().train.learning_rate
  with pytest.raises(UserError):
    tpu_v5e.get_config("lora,lora,model=/m,data=/d.jsonl")
  with pytest.raises(UserError):
    demo.get_config("lorra")
