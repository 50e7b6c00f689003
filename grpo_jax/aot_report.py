"""What `python -m grpo_jax.aot` reports about the programs it compiled for a slice.

Per program and per chip: the bytes of arguments, outputs, temporaries and code and the peak
(from the compiler's memory_analysis()), whether the peak fits the chip's HBM with headroom,
the compiler's FLOPs and bytes accessed, and the compile time. A program the compiler refuses
(RESOURCE_EXHAUSTED) counts with the bytes its message names. The largest contributors to a
peak come from XLA's dump (XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text): the buffers
live at the peak (*-live-range.txt), named by shape and JAX op from the optimized HLO.

The roofline estimate of one GRPO step sums, over its phases, the larger of the time at peak
FLOP/s and the time at HBM bandwidth; the figures are compiler estimates, not measurements.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import re
from typing import Any, Mapping, Sequence

from grpo_jax import aot_targets

_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-chip bytes of one compiled program.

  peak_bytes is the compiler's peak_memory_in_bytes (libtpu and the CUDA plugin report one),
  else arguments + outputs - aliased + temporaries + code (an upper bound).
  """

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  peak_bytes: int

  @classmethod
  def from_analysis(cls, stats: Any) -> Memory:
    """From `compiled.memory_analysis()`."""
    sizes = dict(argument_bytes=stats.argument_size_in_bytes,
                 output_bytes=stats.output_size_in_bytes, alias_bytes=stats.alias_size_in_bytes,
                 temp_bytes=stats.temp_size_in_bytes, code_bytes=stats.generated_code_size_in_bytes)
    peak = getattr(stats, "peak_memory_in_bytes", 0) or (
        sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"]
        + sizes["temp_bytes"] + sizes["code_bytes"])
    return cls(peak_bytes=int(peak), **{k: int(v) for k, v in sizes.items()})


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled (or refused) program. memory is None when the compiler refused it; then
  needed_bytes is what its message names. flops / bytes_accessed: None where the compiler
  gives no cost analysis (GPU) or a negative one (its "unknown")."""

  name: str
  compile_s: float
  needed_bytes: int
  memory: Memory | None = None
  flops: float | None = None
  bytes_accessed: float | None = None
  contributors: tuple[tuple[str, int], ...] = ()  # (description, bytes), largest first


def _cost(analysis: Any, key: str) -> float | None:
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  value = (analysis or {}).get(key)
  return float(value) if value is not None and value >= 0 else None


def compiled_program(name: str, compiled: Any, compile_s: float,
                     contributors: Sequence[tuple[str, int]] = ()) -> Program:
  """A Program from a jax Compiled object (`lowered.compile()`)."""
  memory = Memory.from_analysis(compiled.memory_analysis())
  cost = compiled.cost_analysis()
  return Program(name=name, compile_s=compile_s, needed_bytes=memory.peak_bytes, memory=memory,
                 flops=_cost(cost, "flops"), bytes_accessed=_cost(cost, "bytes accessed"),
                 contributors=tuple(contributors))


# libtpu 0.0.42.1: "... required for HLO temporaries (27.00G) exceeds available HBM (15.75G)."
# The two ways libtpu refuses a program for want of HBM (both seen with libtpu 0.0.42.1).
_OOM = re.compile(r"required for [^(]*\(([\d.]+)([BKMGT])\) exceeds available HBM"
                  r"|Used ([\d.]+)([BKMGT]) of [\d.]+[BKMGT] hbm")


def needed_bytes_from_error(message: str) -> int | None:
  """The bytes a RESOURCE_EXHAUSTED compile error says the program needs (None: not one)."""
  found = _OOM.search(message) if "RESOURCE_EXHAUSTED" in message else None
  if found is None:
    return None
  size, unit = found.group(1, 2) if found.group(1) else found.group(3, 4)
  return int(float(size) * _UNITS[unit])


def fits(peak_bytes: int, hbm_bytes: int, headroom: float) -> bool:
  """Whether a peak leaves at least `headroom` (a fraction) of the chip's HBM free."""
  return peak_bytes <= (1.0 - headroom) * hbm_bytes


# -- the largest contributors, from XLA's dump ----------------------------------------------

_PEAK_HEADER = re.compile(r"^\s*Live ranges at \d+ \(peak\):\s*$")
_LIVE_BUFFER = re.compile(r"^\s+([\w.\-]+)\{([\d,]*)\}: (\d+) bytes")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_LAYOUT = re.compile(r"\{[^{}]*\}")


def live_at_peak(live_range_text: str) -> list[tuple[str, str, int]]:
  """(instruction, tuple index "" or "0,1", bytes) of the buffers live at the peak, from XLA's
  live-range dump."""
  buffers, inside = [], False
  for line in live_range_text.splitlines():
    if _PEAK_HEADER.match(line):
      inside = True
      continue
    if inside:
      found = _LIVE_BUFFER.match(line)
      if not found:
        break
      buffers.append((found.group(1), found.group(2), int(found.group(3))))
  return buffers


def _split_top(text: str) -> list[str]:
  """The top-level comma-separated parts of a tuple shape's inside."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in "(["
    depth -= ch in ")]"
    if ch == "," and depth == 0:
      parts.append(text[start:i].strip())
      start = i + 1
  return parts + [text[start:].strip()]


def _shape(text: str, index: str) -> str:
  """The shape at tuple `index` of an HLO result shape (layouts dropped)."""
  text = _LAYOUT.sub("", text)
  for i in (int(x) for x in index.split(",") if x):
    if not text.startswith("("):
      break
    text = _split_top(text[1:text.rindex(")")])[i]
  return text


def _result_shape(rest: str) -> str:
  """The result shape at the start of an instruction's text after "= "."""
  if not rest.startswith("("):
    return rest.split(" ", 1)[0]
  depth = 0
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return rest[:i + 1]
  return rest


def describe_instructions(hlo_text: str, names: set[str]) -> dict[str, tuple[str, str]]:
  """name -> (result shape, JAX op name or "") for the named instructions of an HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    found = _INSTRUCTION.match(line)
    if found and found.group(1) in names:
      op = _OP_NAME.search(line)
      out[found.group(1)] = (_result_shape(line[found.end():]),
                             op.group(1).replace("\\'", "'") if op else "")
  return out


def peak_contributors(live_range_text: str, hlo_text: str,
                      top: int = 3) -> list[tuple[str, int]]:
  """The `top` largest groups of buffers live at the peak, as (description, bytes).

  Buffers of one shape made by one JAX op form a group ("3 x bf16[196352,4864] from
  jit(train_step)/dot_general").
  """
  live = live_at_peak(live_range_text)
  known = describe_instructions(hlo_text, {name for name, _, _ in live})
  groups: dict[str, list[int]] = collections.defaultdict(list)
  for name, index, size in live:
    shape, op = known.get(name, (name, ""))
    groups[_shape(shape, index) + (f" from {op}" if op else "")].append(size)
  ranked = sorted(groups.items(), key=lambda item: -sum(item[1]))[:top]
  return [((f"{len(sizes)} x " if len(sizes) > 1 else "") + what, sum(sizes))
          for what, sizes in ranked]


def dumped_contributors(dump_dir: str | pathlib.Path, module: str,
                        top: int = 3) -> list[tuple[str, int]]:
  """peak_contributors of the newest dump of jit module `module` (e.g. "jit_train_step") in
  dump_dir; [] when XLA wrote none."""
  root = pathlib.Path(dump_dir)
  ranges = sorted(root.glob(f"module_*.{module}.*after_optimizations-live-range.txt"))
  if not ranges:
    return []
  live_range = ranges[-1]
  hlo = live_range.with_name(live_range.name.replace("-live-range.txt", ".txt"))
  return peak_contributors(live_range.read_text(), hlo.read_text() if hlo.exists() else "", top)


# -- the roofline estimate of one step -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Phase:
  """One part of a step: per-chip FLOPs and bytes accessed of one run, run `count` times."""

  name: str
  flops: float
  bytes_accessed: float
  count: int = 1


def extrapolated_phases(compiled: Mapping[str, tuple[Sequence[Phase], Sequence[Phase]]],
                        layers: Mapping[str, int]) -> list[Phase]:
  """The phases of a model with layers[kind] layers of each kind, from the same phases
  compiled on models of one and of two layers of each kind (compiled[kind] = (one, two)).

  Per phase and per cost: a layer of a kind costs two - one, the rest of the model (embedding,
  unembedding, optimizer, sampling outside the layers) one - (a layer of the first kind), and
  the model the rest plus each of its layers. A loop over layers counts once in XLA's cost
  analysis, and a 28-layer phase compiled unrolled takes tens of minutes; this takes two
  compiles of one or two layers per kind.
  """
  kinds = list(compiled)
  first_one = compiled[kinds[0]][0]

  def total(i: int, field: str) -> float:
    cost = lambda kind, depth: getattr(compiled[kind][depth][i], field)
    layer = {kind: cost(kind, 1) - cost(kind, 0) for kind in kinds}
    return cost(kinds[0], 0) - layer[kinds[0]] + sum(layers[k] * layer[k] for k in kinds)

  return [Phase(phase.name, total(i, "flops"), total(i, "bytes_accessed"), phase.count)
          for i, phase in enumerate(first_one)]


def roofline(phases: Sequence[Phase], chip: aot_targets.Chip, *, chips: int,
             generated_tokens: int, decode: Phase,
             decode_min_bytes: float) -> dict[str, Any]:
  """The roofline estimate of one step (seconds per phase and in all; estimates).

  Each phase takes the larger of flops / peak FLOP/s and bytes / HBM bandwidth, times its
  count. generated_tokens: completion tokens per step over the slice (B * G * N when no row
  stops early). decode: the one decode iteration (one token for every row on a chip);
  decode_min_bytes: what that iteration must read at least (its chip's rollout weights and
  full KV cache).
  """
  rows = {}
  for p in phases:
    compute_s = p.count * p.flops / chip.peak_flops
    memory_s = p.count * p.bytes_accessed / chip.hbm_bandwidth
    rows[p.name] = {"count": p.count, "compute_s": compute_s, "memory_s": memory_s,
                    "s": max(compute_s, memory_s)}
  step_s = sum(row["s"] for row in rows.values())
  return {
      "step_s": step_s,
      "tokens_per_s_per_chip": generated_tokens / step_s / chips if step_s > 0 else math.inf,
      "decode_bytes_per_token": decode.bytes_accessed,
      "decode_min_bytes_per_token": decode_min_bytes,
      "phases": rows,
  }


FILLS = (0.1, 0.5, 0.9)  # decode_by_fill's shares of the cache's slots


def _ceil(a: int, b: int) -> int:
  return -(-a // b)


def _more_blocks(filled: int, block: int, windows: Sequence[int | None]) -> int:
  """The key blocks past the first that the layers read over `filled` slots, all layers
  together (a sliding layer of window W at most ceil(W / block) + 1 of them)."""
  return sum((_ceil(filled, block) if w is None else min(_ceil(filled, block),
                                                          _ceil(w, block) + 1)) - 1
             for w in windows)


def decode_over_the_rollout(decode: Phase, block_bytes: float, *, prompt_slots: int,
                            block: int, windows: Sequence[int | None]) -> Phase:
  """The decode phase with each iteration's bytes at its own fill: decode's bytes count each
  layer's loop over key blocks once, and iteration n of the decode.count reads the blocks up
  to slot prompt_slots + n; the bytes are their mean over the iterations."""
  more = sum(_more_blocks(prompt_slots + n, block, windows)
             for n in range(1, decode.count + 1)) / max(decode.count, 1)
  return dataclasses.replace(decode, bytes_accessed=decode.bytes_accessed + more * block_bytes)


def decode_by_fill(decode: Phase, block_bytes: float, *, slots: int, block: int,
                   windows: Sequence[int | None], weight_bytes: float,
                   kv_bytes: float) -> list[dict[str, Any]]:
  """What one decode iteration reads per chip when FILLS of the cache's slots are filled
  (estimates).

  decode: the decode phase, whose bytes count each layer's loop over key blocks once (one
  block); block_bytes: what one block of one layer adds (decode attention over a cache of one
  block, compiled on its own). At a fill, a layer reads the blocks up to the filled slot (a
  sliding layer of window W at most ceil(W / block) + 1 of them); "every_slot" is what the
  attention that read all slots of every layer read; "min" the chip's weights (weight_bytes)
  and the filled share of its KV cache (kv_bytes full). windows: each layer's W or None.
  """
  total = _ceil(slots, block)
  rows = []
  for fill in FILLS:
    filled = max(1, round(fill * slots))
    rows.append({"fill": fill, "slots": filled,
                 "bytes_per_token": (decode.bytes_accessed
                                     + _more_blocks(filled, block, windows) * block_bytes),
                 "every_slot_bytes_per_token": (decode.bytes_accessed
                                                + len(windows) * (total - 1) * block_bytes),
                 "min_bytes_per_token": weight_bytes + kv_bytes * filled / slots})
  return rows


# -- the verdict, the JSON and the error line ------------------------------------------------


def program_json(p: Program, hbm_bytes: int, headroom: float) -> dict[str, Any]:
  out: dict[str, Any] = {"peak_bytes": p.needed_bytes,
                         "fits": p.memory is not None and fits(p.needed_bytes, hbm_bytes, headroom),
                         "compile_s": round(p.compile_s, 3), "flops": p.flops,
                         "bytes_accessed": p.bytes_accessed,
                         "free_fraction": 1.0 - p.needed_bytes / hbm_bytes}
  if p.memory is not None:
    out.update({k: v for k, v in dataclasses.asdict(p.memory).items() if k != "peak_bytes"})
  out["largest"] = [{"what": what, "bytes": size} for what, size in p.contributors]
  return out


def report(s: aot_targets.Slice, hbm_bytes: int, headroom: float, programs: Sequence[Program],
           step_roofline: dict[str, Any] | None) -> dict[str, Any]:
  """The JSON object --out writes (keys fixed by DESIGN.md; more per program)."""
  per_program = {p.name: program_json(p, hbm_bytes, headroom) for p in programs}
  return {"topology": s.name, "chips": s.chips, "hbm_bytes": hbm_bytes, "headroom": headroom,
          "programs": per_program, "fits": all(p["fits"] for p in per_program.values()),
          "roofline": step_roofline}


def _gib(n: float) -> str:
  return f"{n / aot_targets.GIB:.2f} GiB"


def error_line(s: aot_targets.Slice, hbm_bytes: int, headroom: float,
               programs: Sequence[Program]) -> str | None:
  """The `error:` line for the first program that does not fit (None when all do)."""
  for p in programs:
    if p.memory is not None and fits(p.needed_bytes, hbm_bytes, headroom):
      continue
    refused = " (the compiler refused it)" if p.memory is None else ""
    parts = [f"{what} {_gib(size)}" for what, size in p.contributors]
    if p.memory is not None:
      m = p.memory
      parts.append(f"arguments {_gib(m.argument_bytes)}, temporaries {_gib(m.temp_bytes)}, "
                   f"outputs {_gib(m.output_bytes - m.alias_bytes)} not aliased")
    largest = f"; largest: {'; '.join(parts)}" if parts else ""
    return (f"error: {p.name} needs {_gib(p.needed_bytes)} per chip{refused} but a {s.name} "
            f"chip has {_gib(hbm_bytes)} of HBM, {_gib((1 - headroom) * hbm_bytes)} with "
            f"--headroom={headroom:g}{largest}")
  return None


def format_report(out: dict[str, Any]) -> str:
  """The --out JSON as a table for the terminal (bytes in GiB, per chip)."""
  gib = lambda n: f"{n / aot_targets.GIB:.2f}" if n is not None else "-"
  chips = f"{out['chips']} chip" + ("s" if out["chips"] > 1 else "")
  lines = [f"{out['topology']}: {chips}, {gib(out['hbm_bytes'])} GiB of HBM per "
           f"chip usable, headroom {out['headroom']:.0%} (compiler estimates)",
           f"{'program':<12} {'peak':>7} {'args':>7} {'temp':>7} {'out':>7} {'free':>6} "
           f"{'fits':>5} {'compile s':>9} {'TFLOP':>8} {'GB read':>8}"]
  for name, p in out["programs"].items():
    flops = f"{p['flops'] / 1e12:.3f}" if p["flops"] is not None else "-"
    read = f"{p['bytes_accessed'] / 1e9:.1f}" if p["bytes_accessed"] is not None else "-"
    lines.append(f"{name:<12} {gib(p['peak_bytes']):>7} {gib(p.get('argument_bytes')):>7} "
                 f"{gib(p.get('temp_bytes')):>7} {gib(p.get('output_bytes')):>7} "
                 f"{p['free_fraction']:>6.0%} {'yes' if p['fits'] else 'NO':>5} "
                 f"{p['compile_s']:>9.1f} {flops:>8} {read:>8}")
  roof = out.get("roofline")
  if roof:
    lines.append(f"one step (roofline estimate): {roof['step_s']:.3g} s, "
                 f"{roof['tokens_per_s_per_chip']:.4g} generated tokens/s per chip; a decode "
                 f"step reads {roof['decode_bytes_per_token'] / 1e9:.3g} GB per chip, at least "
                 f"{roof['decode_min_bytes_per_token'] / 1e9:.3g} GB")
    by_fill = roof.get("decode_by_fill")
    if by_fill:
      gb = lambda key: " / ".join(f"{row[key] / 1e9:.3g}" for row in by_fill)
      shares = " / ".join(f"{row['fill']:.0%}" for row in by_fill)
      lines.append(f"  decode at {shares} of the cache: {gb('bytes_per_token')} GB per chip "
                   f"(reading every slot "
                   f"{by_fill[0]['every_slot_bytes_per_token'] / 1e9:.3g}; at least "
                   f"{gb('min_bytes_per_token')})")
    lines.append("  " + "; ".join(
        f"{name} {row['count']} x {row['s'] / row['count'] * 1e3:.3g} ms "
        f"({'memory' if row['memory_s'] >= row['compute_s'] else 'compute'} bound)"
        for name, row in roof["phases"].items()))
  lines += [f"note: {note}" for note in out.get("notes", ())]
  return "\n".join(lines)
