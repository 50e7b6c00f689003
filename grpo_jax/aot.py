"""Will it fit? Compile a config's programs for a TPU or GPU slice on this CPU-only host.

  python -m grpo_jax.aot --config=configs/tpu_v5e.py:model=Qwen2.5-1.5B,data=train.jsonl \
      --topology=v5e-8 [--headroom=0.1] [--out=FILE.json] [--noroofline] [--config.<key>=value ...]

Builds what grpo_jax.main builds for the config on the slice's chips (builder.train_setup:
the same mesh, shardings, optimizer, init, train step and evaluation sampler, and the
cold-start SFT step when sft.num_steps > 0) over abstract parameters: no weights, data or
tokenizer are read. The model's shape is model.path's config.json when model.path is a
directory, else the published config of the checkpoint it names (models/published.py:
"Qwen2.5-1.5B", "Llama-3.1-8B", ...; "" is the demo model). Each program is compiled by the
slice's own compiler (libtpu, or the jax CUDA plugin; `pip install -e ".[aot]"`) and
reported per chip (aot_report.py); with the compiler's cost analysis (TPU) also a roofline
estimate of one step, from the step's phases compiled on their own: sampling once plus one
decode iteration for each further token, the old / reference log-prob passes, and each
update's first micro-batch with its optimizer step plus the other micro-batches' gradients.
The phases are compiled on models of one and two layers of each layer kind (unrolled) and
extrapolated to the model's depth: XLA's cost analysis counts a loop body once, and a
full-depth unrolled phase takes tens of minutes to compile.

Exit 0: every program fits with --headroom of the HBM free; 1: one does not (one `error:`
line naming it, its bytes, the HBM and its largest buffers); 2: a user error.

Compile-only differences from a run, none of which changes the memory materially: the
prompts are padded to data.max_prompt_len (the largest bucket); on GPU targets, whose
compile-only client cannot lower host callbacks, the reward callback is replaced by a jnp
stand-in traced into the step (aot_rewards.StandInReward: [R] and [F, R] floats, as the
callback's).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Callable

from grpo_jax import aot_targets

with aot_targets.startup_noise_hidden():  # the CUDA plugin logs when jax is first imported
  import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from grpo_jax import aot_report
from grpo_jax import aot_rewards
from grpo_jax import builder
from grpo_jax import cli
from grpo_jax import config as config_lib
from grpo_jax import data as data_lib
from grpo_jax import mesh as mesh_lib
from grpo_jax import models
from grpo_jax import optimizer as optimizer_lib
from grpo_jax import rewards as rewards_lib
from grpo_jax import sampler as sampler_lib
from grpo_jax import sft as sft_lib
from grpo_jax import train_step as train_step_lib
from grpo_jax.errors import UserError, exit_on_user_error
from grpo_jax.models import attention, checkpoint_io, published
from grpo_jax.models import config as model_config_lib


def _define_flags() -> None:
  cli.define_flags(workdir=False)
  flags.DEFINE_string("topology", None, "The slice, as users name it: v4-8, v5e-8, v6e-8, "
                      "h100x1, h100x8, ... (an unknown name lists them all).")
  flags.DEFINE_float("headroom", 0.1, "Share of each chip's HBM a program must leave free.")
  flags.DEFINE_string("out", "", "Write the report as JSON here (keys in DESIGN.md).")
  flags.DEFINE_bool("roofline", True, "Also compile the step's phases for the roofline "
                    "estimate (TPU; --noroofline: memory only, in about half the time).")


# -- the model's shape -------------------------------------------------------------------------


def model_config(cfg: config_lib.Config, backend: str):
  """The ModelConfig of model.path without reading weights: its config.json, a published
  checkpoint's by name, or the demo model; attention as model.attention resolves on backend."""

  path = cfg.model.path
  if not path:
    return builder.demo_model_config(cfg, data_lib.demo_tokenizer(), backend)
  hf = (checkpoint_io.read_hf_config(pathlib.Path(path)) if os.path.isdir(path)
        else published.config(path))
  return models.ModelConfig.from_hf(hf, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                    remat=cfg.model.remat,
                                    attention=builder.attention_impl(cfg, backend))


# -- compiling ---------------------------------------------------------------------------------


def _abstract(tree, shardings):
  """ShapeDtypeStructs of tree's leaves with the matching shardings."""

  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _chip_bytes(tree) -> int:
  """Bytes one chip holds of abstract arrays with shardings."""

  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def compile_program(name: str, jitted, args: tuple, dump_root: str,
                    static: dict[str, Any] | None = None) -> aot_report.Program:
  """jitted lowered with abstract args and compiled; a refusal for want of memory becomes a
  Program with the bytes the compiler names. The largest buffers at the peak come from the
  compile's own XLA dump."""

  dump = os.path.join(dump_root, name)
  start = time.perf_counter()
  lowered = jitted.lower(*args, **(static or {}))
  options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True}
  try:
    compiled = lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    needed = aot_report.needed_bytes_from_error(str(e))
    if needed is None:
      raise
    return aot_report.Program(name, time.perf_counter() - start, needed,
                              contributors=tuple(_contributors(dump)))
  seconds = time.perf_counter() - start
  return aot_report.compiled_program(name, compiled, seconds, _contributors(dump))


def _contributors(dump: str) -> list[tuple[str, int]]:
  """The largest buffers at the peak of the one module dumped under dump."""
  modules = {f.split(".")[1] for f in os.listdir(dump) if f.startswith("module_")} if (
      os.path.isdir(dump)) else set()
  return aot_report.dumped_contributors(dump, modules.pop()) if len(modules) == 1 else []


@dataclasses.dataclass
class Plan:
  """What is compiled for a config on a slice: the setup and the abstract inputs."""

  cfg: config_lib.Config
  slice: aot_targets.Slice
  setup: Any  # builder.TrainSetup
  model_config: Any
  reward_fn: Callable
  reward_names: tuple[str, ...]

  @functools.cached_property
  def state(self):
    return self.setup.abstract_state()

  def replicated(self, shape, dtype):

    return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.replicated(self.setup.mesh))

  def batch(self):

    b, t = self.cfg.sampled_prompts_per_step, self.cfg.data.max_prompt_len
    return train_step_lib.Batch(prompt_tokens=self.replicated((b, t), jnp.int32),
                                prompt_mask=self.replicated((b, t), jnp.int32),
                                row_ids=self.replicated((b,), jnp.int32))

  def programs(self) -> list[tuple[str, Any, tuple, dict]]:
    """(name, jitted, abstract args, static kwargs) of what a run compiles."""

    setup, cfg = self.setup, self.cfg
    out = [("init", setup.init, (_abstract(setup.abstract_params, setup.layout.params),), {}),
           ("train_step", setup.train_step(self.reward_fn, self.reward_names),
            (self.state, self.batch()), {})]
    if cfg.eval.num_prompts > 0:
      k = cfg.eval.k
      prompts = min(cfg.eval.num_prompts, max(1, 256 // k))  # evaluate.sample_completions
      tokens = self.replicated((prompts, cfg.data.max_prompt_len), jnp.int32)
      key = jax.eval_shape(lambda: jax.random.key(0))
      out.append(("eval_sample", setup.eval_sample_fn(),
                  (self.state.params, tokens, tokens, self.replicated(key.shape, key.dtype)),
                  {"samples_per_prompt": k}))
    if cfg.sft.num_steps > 0:
      out.append(self._sft_program())
    return out

  def _sft_program(self):

    tx, _ = optimizer_lib.for_sft(self.cfg)
    split = sft_lib.trainable_split(self.cfg)
    params = self.state.params
    trainable = jax.eval_shape(lambda p: split(p)[0], params)
    opt_state = jax.eval_shape(tx.init, trainable)
    opt_state = _abstract(opt_state, mesh_lib.opt_state_shardings(
        tx, opt_state, split(self.setup.layout.params)[0]))
    tokens = self.replicated((self.cfg.sft.batch_size, self.cfg.sft.max_len), jnp.int32)
    key = self.replicated((2,), jnp.uint32)
    return ("sft_step", sft_lib.make_sft_step(self.setup.graphdef, tx, split),
            (params, opt_state, tokens, tokens, tokens, key), {})

  # -- the phases of one step, for the roofline ------------------------------------------------

  def phase_programs(self) -> list[tuple[str, Any, tuple, dict, int]]:
    """(name, jitted, abstract args, static kwargs, runs per step) of the step's phases, each
    from train_step's own functions, compiled on its own (XLA's cost analysis counts a loop
    body once, so the loops a step runs are counted here): sampling (prefill, the first
    token and one decode iteration), the N - 1 further decode iterations, the old and
    reference log-prob passes (one micro-batch's, M x A times), and the mu x M updates, each
    its first micro-batch with the optimizer step (minibatch_update) and A - 1 more
    micro-batch gradients."""
    setup, settings, cfg = self.setup, self.setup.settings, self.cfg
    graphdef, layout, state = setup.graphdef, setup.layout, self.state
    key = self.replicated((2,), jnp.uint32)
    sample = jax.jit(functools.partial(train_step_lib.sample, graphdef, settings=settings,
                                       layout=layout))
    rollout = jax.eval_shape(sample, state.params, self.batch(), key)
    rollout = _abstract(rollout, jax.tree.map(lambda _: layout.rows, rollout))
    n = settings.sampling.max_new_tokens
    out = [("rollout", sample, (state.params, self.batch(), key), {}, 1),
           ("decode", *self.decode_program(), {}, n - 1)]
    logps = jax.jit(functools.partial(train_step_lib.reference_logps, graphdef,
                                      settings=settings, layout=layout))
    old, ref = jax.eval_shape(logps, state, rollout)
    if old is not None or ref is not None:  # a loop over the M x A micro-batches: counted once
      out.append(("logps", logps, (state, rollout), {}, settings.micro_batches))
    r = rollout.tokens.shape[0]
    advs = train_step_lib.Advantages(
        advs=jax.ShapeDtypeStruct((r, n) if cfg.grpo.supervision == "process" else (r,),
                                  jnp.float32),
        loss_mask=rollout.mask, kept=jax.ShapeDtypeStruct((r,), jnp.float32),
        zero_std=jax.ShapeDtypeStruct((r // cfg.grpo.num_generations,), bool))
    batches = jax.eval_shape(functools.partial(train_step_lib.loss_batches, settings=settings),
                             rollout, advs, old, ref)
    stacked = NamedSharding(setup.mesh, P(None, *layout.rows.spec))
    minibatch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=stacked), batches)
    updates, accum = settings.grpo.updates_per_step, settings.grad_accum_steps
    update = jax.jit(functools.partial(train_step_lib.minibatch_update, graphdef, setup.tx,
                                       settings=settings, layout=layout))
    out.append(("update", update, (state.params, state.opt_state, minibatch), {}, updates))
    if accum > 1:
      micro = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=layout.rows), minibatch)
      grad = jax.jit(jax.value_and_grad(functools.partial(
          train_step_lib.micro_loss, graphdef=graphdef, settings=settings, layout=layout),
                                        has_aux=True))
      count = self.replicated((), jnp.float32)
      out.append(("micro_grad", grad, (state.params, micro, count, count), {},
                  updates * (accum - 1)))
    return out

  def decode_program(self) -> tuple[Any, tuple]:
    """(jitted, abstract args) of one decode iteration (sampler.decode_step) over the step's
    B' * G rows, with the rollout layout of its weights and a cache of T + N slots."""
    settings, layout, mc = self.setup.settings, self.setup.layout, self.model_config
    t, n = self.cfg.data.max_prompt_len, settings.sampling.max_new_tokens
    r = self.cfg.sampled_prompts_per_step * self.cfg.grpo.num_generations
    weights = jax.eval_shape(
        lambda p: mesh_lib.rollout_params(p, layout.params, mc.compute_dtype),
        self.setup.abstract_params)
    weights = _abstract(weights, jax.tree.map(mesh_lib.rollout_sharding, layout.params))
    cache = jax.eval_shape(lambda: models.init_cache(mc, r, t + n))
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=layout.rows)
    state = sampler_lib.DecodeState(
        step=self.replicated((), jnp.int32), tokens=rows((r, n), jnp.int32),
        logprobs=rows((r, n), jnp.float32), done=rows((r,), bool),
        cache=_abstract(cache, jax.tree.map(lambda _: layout.rows, cache)),
        key=self.replicated((2,), jnp.uint32), positions=rows((r,), jnp.int32))
    graphdef, sampling = self.setup.graphdef, settings.sampling
    step = jax.jit(lambda p, s: sampler_lib.decode_step(nnx.merge(graphdef, p), s, sampling, t),
                   donate_argnums=(1,))
    return step, (weights, state)

  def decode_chip_bytes(self) -> tuple[int, int]:
    """(rollout weights, full KV cache of its rows) bytes on a chip, as decode_program has
    them."""
    _, (weights, state) = self.decode_program()
    return _chip_bytes(weights), _chip_bytes((state.cache.k, state.cache.v))

  def decode_min_bytes(self) -> float:
    """What one decode iteration must read on a chip at least: its rollout weights and its
    rows' keys and values, the cache filled to T + N / 2 slots (the mean over the decode)."""
    weights, kv = self.decode_chip_bytes()
    t, n = self.cfg.data.max_prompt_len, self.setup.settings.sampling.max_new_tokens
    return weights + kv * (t + n / 2) / (t + n)

  def decode_block_bytes(self, dump_root: str) -> float | None:
    """What one more key block adds to a decode iteration on a chip, per layer: the decode
    attention (attention.decode_attend) of the chip's rows over a cache of one block,
    compiled on its own (the decode loop over blocks counts once in XLA's cost analysis)."""
    mc, rows = self.model_config, self.setup.layout.rows
    r = self.cfg.sampled_prompts_per_step * self.cfg.grpo.num_generations
    block = attention.DECODE_BLOCK_KV
    arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    kv = arg((r, mc.num_kv_heads, block, mc.head_dim), mc.compute_dtype)
    attend = jax.jit(lambda q, k, v, valid, slot: attention.decode_attend(
        q, k, v, key_valid_bs=valid, query_offset=slot))
    program = _announce(compile_program(
        "decode_block", attend, (arg((r, 1, mc.num_heads, mc.head_dim), mc.compute_dtype), kv,
                                 kv, arg((r, block), bool), self.replicated((), jnp.int32)),
        dump_root))
    return program.bytes_accessed

  def compiled_phases(self, dump_root: str) -> list[aot_report.Phase] | None:
    """phase_programs compiled, with their costs (None when the compiler gives no cost
    analysis)."""
    phases = []
    for name, jitted, args, static, count in self.phase_programs():
      program = _announce(compile_program(f"phase_{name}", jitted, args, dump_root, static))
      if program.flops is None or program.bytes_accessed is None:
        return None
      phases.append(aot_report.Phase(name, program.flops, program.bytes_accessed, count))
    return phases

  def roofline(self, phases: list[aot_report.Phase], dump_root: str) -> dict[str, Any]:
    """The roofline estimate of one step from its phases' costs, each decode iteration's
    bytes at its own fill of the cache, and the decode's bytes at aot_report.FILLS."""
    g, n = self.cfg.grpo.num_generations, self.setup.settings.sampling.max_new_tokens
    t, mc = self.cfg.data.max_prompt_len, self.model_config
    counted = next(p for p in phases if p.name == "decode")  # one key block a layer
    block_bytes = self.decode_block_bytes(dump_root)
    windows = [mc.sliding_window if mc.layer_type(i) == model_config_lib.SLIDING else None
               for i in range(mc.num_layers)]
    block = attention.DECODE_BLOCK_KV
    decode = counted if block_bytes is None else aot_report.decode_over_the_rollout(
        counted, block_bytes, prompt_slots=t, block=block, windows=windows)
    phases = [decode if p.name == "decode" else p for p in phases]
    roof = aot_report.roofline(phases, self.slice.chip, chips=self.slice.chips,
                               generated_tokens=self.cfg.sampled_prompts_per_step * g * n,
                               decode=decode, decode_min_bytes=self.decode_min_bytes())
    if block_bytes is not None:
      weights, kv = self.decode_chip_bytes()
      roof["decode_by_fill"] = aot_report.decode_by_fill(
          counted, block_bytes, slots=t + n, block=block, windows=windows,
          weight_bytes=weights, kv_bytes=kv)
    return roof


def layer_phases(plan: Plan, devices, dump_root: str) -> list[aot_report.Phase] | None:
  """The costs of the plan's step phases at its L layers, extrapolated from the phases
  compiled on models of one and two layers of each kind it has, unrolled
  (aot_report.extrapolated_phases); None when the compiler gives no cost analysis."""
  mc = plan.model_config
  kinds = [mc.layer_type(i) for i in range(mc.num_layers)]
  compiled = {}
  for kind in dict.fromkeys(kinds):
    one, two = (_at_depth(plan, devices, (kind,) * depth).compiled_phases(dump_root)
                for depth in (1, 2))
    if one is None or two is None:
      return None
    compiled[kind] = (one, two)
  return aot_report.extrapolated_phases(compiled, collections.Counter(kinds))


def _at_depth(plan: Plan, devices, layer_types: tuple[str, ...]) -> Plan:
  """The plan's config on a model of len(layer_types) layers of those kinds, the layers
  unrolled."""
  cfg = dataclasses.replace(plan.cfg, model=dataclasses.replace(plan.cfg.model,
                                                                scan_layers=False))
  mc = dataclasses.replace(plan.model_config, num_layers=len(layer_types), scan_layers=False,
                           layer_types=layer_types if plan.model_config.layer_types else ())
  setup = builder.train_setup(cfg, mc, builder.sampling_settings(cfg, None, mc), devices)
  return dataclasses.replace(plan, cfg=cfg, setup=setup, model_config=mc)


def _announce(program: aot_report.Program) -> aot_report.Program:
  """Says on stderr that a program compiled (a full-size step takes minutes) and its peak,
  and lets go of the compiler's memory before the next one."""
  gib = program.needed_bytes / aot_targets.GIB
  print(f"compiled {program.name} in {program.compile_s:.1f} s: {gib:.2f} GiB per chip"
        + (" (refused)" if program.memory is None else ""), file=sys.stderr, flush=True)
  jax.clear_caches()
  gc.collect()
  return program


# -- the command -----------------------------------------------------------------------------


@exit_on_user_error
def run(config, topology: str | None, headroom: float, out_path: str = "",
        with_roofline: bool = True) -> int:
  """Compiles config's programs for the slice called topology and prints the report; returns
  the exit code (0 all fit, 1 one does not)."""
  if config is None or not topology:
    raise UserError("--config and --topology are required, e.g. --config=configs/tpu_v5e.py:"
                    "model=Qwen2.5-1.5B,data=train.jsonl --topology=v5e-8")
  target = aot_targets.parse_topology(topology)
  if not 0 <= headroom < 1:
    raise UserError(f"--headroom={headroom:g} is not allowed: a share of the HBM in [0, 1)")
  aot_targets.prepare_environment(target)
  jax.config.update("jax_platforms", "cpu")
  devices = aot_targets.compile_devices(target)  # first: it starts JAX's backends
  cfg = config_lib.freeze(config, num_devices=target.chips)
  mc = model_config(cfg, "tpu" if target.platform == "tpu" else "gpu")
  names = tuple(spec.name for spec in rewards_lib.parse_spec(cfg.rewards))
  stand_in = aot_rewards.HostReward if target.platform == "tpu" else aot_rewards.StandInReward
  reward = stand_in(len(names), cfg.grpo.step_slots)
  setup = builder.train_setup(cfg, mc, builder.sampling_settings(cfg, None, mc), devices)
  plan = Plan(cfg=cfg, slice=target, setup=setup, model_config=mc, reward_fn=reward,
              reward_names=names)
  hbm = aot_targets.usable_hbm_bytes(target)
  with tempfile.TemporaryDirectory(prefix="grpo_jax_aot_") as dump:
    programs = [_announce(compile_program(name, jitted, args, dump, static))
                for name, jitted, args, static in plan.programs()]
    line = aot_report.error_line(target, hbm, headroom, programs)
    costed = next(p for p in programs if p.name == "train_step").flops is not None
    lora = cfg.model.lora.rank > 0  # its rollout merges the adapters: not in decode_program
    phases = (layer_phases(plan, devices, dump) if with_roofline and costed and not lora
              and line is None else None)
    roof = plan.roofline(phases, dump) if phases else None
  out = aot_report.report(target, hbm, headroom, programs, roof)
  out["model"] = {"path": cfg.model.path or "demo", "params": _param_count(setup),
                  "layers": mc.num_layers, "hidden_size": mc.hidden_size,
                  "attention": mc.attention}
  out["software"] = _versions()
  out["notes"] = []
  if isinstance(reward, aot_rewards.StandInReward):
    out["notes"].append("the reward callback is a jnp stand-in traced into the step (this "
                        "compile-only target cannot lower host callbacks)")
  if roof is None:
    out["notes"].append("no roofline estimate: " + (
        "--noroofline" if not with_roofline else "a program does not fit" if line
        else "not yet for LoRA" if lora else "the compiler gives no cost analysis here"))
  else:
    out["notes"].append(f"the roofline's phases were compiled with one and two layers of each "
                        f"kind, unrolled, and extrapolated to {mc.num_layers} (XLA's cost "
                        f"analysis counts a loop body once)")
  print(aot_report.format_report(out))
  if out_path:
    with open(out_path, "w") as f:
      json.dump(out, f, indent=1)
  if line:
    print(line, file=sys.stderr)
    return 1
  return 0


def _param_count(setup) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_params))


def _versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  found = {}
  for package in ("jax", "libtpu", "jax-cuda12-plugin"):
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      continue
  return found


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  sys.exit(run(f.config, f.topology, f.headroom, f.out, f.roofline))


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
