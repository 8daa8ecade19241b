"""Hugging Face LLaVA tensor names <-> canonical jaxprune parameter names (and layout transforms).

Three on-disk generations of ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
keys exist (see the project's jax.md §2.4):

==========================  ==================================  ====================================
part                        legacy llava-hf (transformers 4.x)  transformers 5 (``save_pretrained``)
==========================  ==================================  ====================================
decoder                     ``language_model.model.*``          ``model.language_model.*``
LM head                     ``language_model.lm_head.weight``   ``lm_head.weight``
CLIP tower                  ``vision_tower.vision_model.*``     ``model.vision_tower.vision_model.*``
                                                                or, flattened (5.18+),
                                                                ``model.vision_tower.*``
projector                   ``multi_modal_projector.*``         ``model.multi_modal_projector.*``
NeXT newline                ``image_newline``                   ``model.image_newline``
==========================  ==================================  ====================================

Every key is first normalised (:func:`normalize_hf_key`) to one *normal form* (``language_model.*``,
``lm_head.weight``, ``vision_tower.*`` without ``vision_model.``, ``multi_modal_projector.*``,
``image_newline``), then exactly one rule of :data:`RULES` maps it to a canonical name of
:func:`jaxprune.models.param_spec.param_shapes` plus an axis permutation:

* Linear ``weight [out, in]`` -> ``kernel [in, out]`` (``.T``), including ``lm_head``;
* the CLIP / SigLIP patch conv ``[D, C, p, p]`` -> ``[p, p, C, D]`` (``transpose(2, 3, 1, 0)``; SigLIP's conv
  bias and Qwen2's q / k / v biases unchanged);
* embeddings (token, position), the class embedding, biases and ``image_newline``: unchanged;
* LayerNorm / RMSNorm ``weight`` -> ``scale`` (unchanged values).

Ignorable keys (:data:`IGNORED`; skipped silently because they are buffers, not parameters):

* ``language_model.layers.N.self_attn.rotary_emb.inv_freq`` and ``language_model.rotary_emb.inv_freq``
  (RoPE frequency buffers saved by transformers < 4.31; recomputed from ``rope_theta``);
* ``vision_tower.embeddings.position_ids`` (CLIP's ``arange`` buffer saved by older transformers).

The inverse (:func:`canonical_to_hf`) renders a canonical name in the ``"legacy"`` or ``"v5"``
layout (``v5`` = what transformers 5 ``save_pretrained`` writes, i.e. the flattened CLIP keys).
:class:`Spelling` / :func:`file_spelling` render a normal-form key the way one particular file spells
its keys (:data:`HF_SPELLINGS` here, the original-LLaVA and CLIP ones in :mod:`jaxprune.checkpoints.original`),
so an error about a missing tensor names it exactly as it would appear in that file.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Iterable, Literal, Sequence

Perm = tuple[int, ...] | None
LINEAR: Perm = (1, 0)
CONV: Perm = (2, 3, 1, 0)
Layout = Literal["legacy", "v5"]
LAYOUTS: tuple[str, ...] = ("legacy", "v5")


def inverse_perm(perm: Perm) -> Perm:
    """The permutation that undoes ``perm`` (``None`` for the identity)."""
    if perm is None:
        return None
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def permuted_shape(shape: tuple[int, ...], perm: Perm) -> tuple[int, ...]:
    """The shape of ``np.transpose(x, perm)`` for ``x.shape == shape`` (checked rank)."""
    if perm is None:
        return tuple(shape)
    if len(shape) != len(perm):
        raise ValueError(f"rank {len(shape)} tensor cannot take permutation {perm}")
    return tuple(shape[p] for p in perm)


def _compile(template: str, choices: tuple[str, ...]) -> re.Pattern:
    pat = re.escape(template).replace(re.escape("<i>"), r"(?P<i>\d+)")
    if choices:
        pat = pat.replace(re.escape("<m>"), "(?P<m>" + "|".join(map(re.escape, choices)) + ")")
    return re.compile(pat)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``hf`` (normal form) <-> ``canonical``; ``<i>`` is a layer index, ``<m>`` one of ``choices``.

    ``perm`` turns the HF tensor into the JAX one (``np.transpose(hf, perm)``).
    """

    hf: str
    canonical: str
    perm: Perm = None
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "_hf_re", _compile(self.hf, self.choices))
        object.__setattr__(self, "_can_re", _compile(self.canonical, self.choices))

    @staticmethod
    def _render(template: str, m: re.Match) -> str:
        out = template
        for g in ("i", "m"):
            if f"<{g}>" in out:
                out = out.replace(f"<{g}>", m.group(g))
        return out

    def to_canonical(self, normal_key: str) -> str | None:
        m = self._hf_re.fullmatch(normal_key)
        return None if m is None else self._render(self.canonical, m)

    def to_hf(self, canonical: str) -> str | None:
        m = self._can_re.fullmatch(canonical)
        return None if m is None else self._render(self.hf, m)


_V, _L = "vision_tower.", "language_model."
#: CLIP towers: (normal-form prefix, canonical prefix). Video-LLaVA has two (``image_tower``, ``video_tower``).
TOWERS: tuple[tuple[str, str], ...] = ((_V, "vision."), ("image_tower.", "image_tower."),
                                       ("video_tower.", "video_tower."))


def _clip_rules(t: str, c: str) -> tuple[Rule, ...]:
    return (
        Rule(t + "embeddings.class_embedding", c + "class_embedding"),
        Rule(t + "embeddings.patch_embedding.weight", c + "patch_embedding.kernel", CONV),
        Rule(t + "embeddings.patch_embedding.bias", c + "patch_embedding.bias"),  # SigLIP
        Rule(t + "embeddings.position_embedding.weight", c + "position_embedding.embedding"),
        Rule(t + "<m>.weight", c + "<m>.scale", None, ("pre_layrnorm", "post_layernorm")),
        Rule(t + "<m>.bias", c + "<m>.bias", None, ("pre_layrnorm", "post_layernorm")),
        Rule(t + "encoder.layers.<i>.<m>.weight", c + "layers.<i>.<m>.scale", None, ("layer_norm1", "layer_norm2")),
        Rule(t + "encoder.layers.<i>.<m>.bias", c + "layers.<i>.<m>.bias", None, ("layer_norm1", "layer_norm2")),
        Rule(t + "encoder.layers.<i>.self_attn.<m>.weight", c + "layers.<i>.self_attn.<m>.kernel", LINEAR,
             ("q_proj", "k_proj", "v_proj", "out_proj")),
        Rule(t + "encoder.layers.<i>.self_attn.<m>.bias", c + "layers.<i>.self_attn.<m>.bias", None,
             ("q_proj", "k_proj", "v_proj", "out_proj")),
        Rule(t + "encoder.layers.<i>.mlp.<m>.weight", c + "layers.<i>.mlp.<m>.kernel", LINEAR, ("fc1", "fc2")),
        Rule(t + "encoder.layers.<i>.mlp.<m>.bias", c + "layers.<i>.mlp.<m>.bias", None, ("fc1", "fc2")),
    )


RULES: tuple[Rule, ...] = tuple(r for t, c in TOWERS for r in _clip_rules(t, c)) + (
    Rule("multi_modal_projector.<m>.weight", "projector.<m>.kernel", LINEAR, ("linear_1", "linear_2")),
    Rule("multi_modal_projector.<m>.bias", "projector.<m>.bias", None, ("linear_1", "linear_2")),
    Rule(_L + "embed_tokens.weight", "language.embed_tokens.embedding"),
    Rule(_L + "layers.<i>.<m>.weight", "language.layers.<i>.<m>.scale", None,
         ("input_layernorm", "post_attention_layernorm")),
    Rule(_L + "layers.<i>.self_attn.<m>.weight", "language.layers.<i>.self_attn.<m>.kernel", LINEAR,
         ("q_proj", "k_proj", "v_proj", "o_proj")),
    Rule(_L + "layers.<i>.self_attn.<m>.bias", "language.layers.<i>.self_attn.<m>.bias", None,
         ("q_proj", "k_proj", "v_proj")),  # Qwen2
    Rule(_L + "layers.<i>.mlp.<m>.weight", "language.layers.<i>.mlp.<m>.kernel", LINEAR,
         ("gate_proj", "up_proj", "down_proj")),
    Rule(_L + "norm.weight", "language.norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", LINEAR),
    Rule("image_newline", "image_newline"),
)

#: Normal-form keys that are buffers, not parameters; skipped.
IGNORED: tuple[re.Pattern, ...] = (
    re.compile(r"language_model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    re.compile(r"language_model\.rotary_emb\.inv_freq"),
    re.compile(r"(vision|image|video)_tower\.embeddings\.position_ids"),
)


def normalize_hf_key(key: str) -> str:
    """Map a legacy or transformers-5 LLaVA key to the normal form (see the module docstring)."""
    k = key
    if k.startswith("model."):  # transformers 5: model.{language_model,vision_tower,multi_modal_projector,...}
        k = k[len("model."):]
    elif k.startswith("language_model.model."):  # legacy decoder
        k = _L + k[len("language_model.model."):]
    elif k.startswith("language_model.lm_head."):  # legacy LM head
        k = "lm_head." + k[len("language_model.lm_head."):]
    for t, _ in TOWERS:
        if k.startswith(t + "vision_model."):
            k = t + k[len(t + "vision_model."):]
    return k


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """Where one source key goes: ``status`` is ``"param"``, ``"ignored"`` or ``"unknown"``."""

    source: str
    normal: str
    status: Literal["param", "ignored", "unknown"]
    canonical: str | None = None
    perm: Perm = None


def map_normal_key(source: str, normal: str) -> KeyMapping:
    """Apply :data:`RULES` to a normal-form key; exactly one rule may match."""
    if any(p.fullmatch(normal) for p in IGNORED):
        return KeyMapping(source, normal, "ignored")
    hits = [(r, c) for r in RULES if (c := r.to_canonical(normal)) is not None]
    if not hits:
        return KeyMapping(source, normal, "unknown")
    if len(hits) > 1:  # a bug in RULES, not in the checkpoint
        raise AssertionError(f"key {source!r} matches {len(hits)} rules: {[r.hf for r, _ in hits]}")
    rule, canonical = hits[0]
    return KeyMapping(source, normal, "param", canonical, rule.perm)


def map_hf_key(key: str) -> KeyMapping:
    """Classify one HF LLaVA checkpoint key (any of the three generations)."""
    return map_normal_key(key, normalize_hf_key(key))


def canonical_to_normal(name: str) -> tuple[str, Perm]:
    """Canonical name -> (normal-form HF key, permutation turning the JAX array into the HF tensor)."""
    hits = [(r, k) for r in RULES if (k := r.to_hf(name)) is not None]
    if len(hits) != 1:
        raise KeyError(f"no unique HF key for canonical parameter {name!r} ({len(hits)} rules match)")
    rule, key = hits[0]
    return key, inverse_perm(rule.perm)


def render_layout(normal: str, layout: Layout) -> str:
    """Render a normal-form key in the ``"legacy"`` or ``"v5"`` on-disk layout."""
    if layout == "legacy":
        if normal.startswith(_L):
            return "language_model.model." + normal[len(_L):]
        if normal.startswith("lm_head."):
            return "language_model." + normal
        for t, _ in TOWERS:
            if normal.startswith(t):
                return t + "vision_model." + normal[len(t):]
        return normal
    if layout == "v5":
        return normal if normal.startswith("lm_head.") else "model." + normal
    raise ValueError(f"unknown HF layout {layout!r} (expected one of {LAYOUTS})")


def canonical_to_hf(name: str, layout: Layout) -> tuple[str, Perm]:
    """Canonical name -> (HF key in ``layout``, permutation turning the JAX array into the HF tensor)."""
    normal, perm = canonical_to_normal(name)
    return render_layout(normal, layout), perm


@dataclasses.dataclass(frozen=True)
class Spelling:
    """How one on-disk layout spells normal-form keys: ``(normal prefix, file prefix)`` pairs.

    :meth:`render` replaces the longest matching normal prefix by its file prefix (``None`` when no
    prefix matches: the layout has no such part).
    """

    name: str
    prefixes: tuple[tuple[str, str], ...]

    def render(self, normal: str) -> str | None:
        hits = [(n, f) for n, f in self.prefixes if normal.startswith(n)]
        if not hits:
            return None
        n, f = max(hits, key=lambda nf: len(nf[0]))
        return f + normal[len(n):]


def _hf_spelling(name: str, decoder: str, head: str, tower: str, outer: str) -> Spelling:
    """``tower``: how the file spells the ``vision_tower.`` prefix; Video-LLaVA's towers are spelled alike."""
    towers = tuple((t, tower.replace(_V, t)) for t, _ in TOWERS)
    return Spelling(name, ((_L, decoder), ("lm_head.", head), *towers,
                           ("multi_modal_projector.", outer + "multi_modal_projector."),
                           ("image_newline", outer + "image_newline")))


#: The HF LLaVA file layouts, most common first (the first wins a tie).
HF_SPELLINGS: tuple[Spelling, ...] = (
    _hf_spelling("legacy", "language_model.model.", "language_model.lm_head.", _V + "vision_model.", ""),
    _hf_spelling("v5", "model.language_model.", "lm_head.", "model." + _V, "model."),
    _hf_spelling("v5-nested-clip", "model.language_model.", "lm_head.", "model." + _V + "vision_model.", "model."),
    _hf_spelling("legacy-flat-clip", "language_model.model.", "language_model.lm_head.", _V, ""),
)


def model_part(normal: str) -> str:
    """The part of the model a normal-form key belongs to (``language_model``, ``lm_head``, ``vision_tower``, ...)."""
    return normal.split(".", 1)[0]


def file_spelling(mappings: Iterable[KeyMapping], spellings: Sequence[Spelling]) -> Callable[[str], str]:
    """A function spelling a normal-form key the way the file holding ``mappings`` spells its keys.

    For each part of the model (:func:`model_part`) the spelling that reproduces the most of the
    file's keys of that part wins; a part with no key in the file takes the spelling that reproduces
    the most keys overall (the first of ``spellings`` on a tie). So a file that mixes layouts (say,
    transformers-5 decoder keys with a legacy CLIP tower) is answered part by part.
    """
    hits: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    for m in mappings:
        if m.status == "unknown":
            continue
        for i, sp in enumerate(spellings):
            if sp.render(m.normal) == m.source:
                hits[i, model_part(m.normal)] += 1
                totals[i] += 1

    def spell(normal: str) -> str:
        part = model_part(normal)
        for i in sorted(range(len(spellings)), key=lambda i: (-hits[i, part], -totals[i], i)):
            key = spellings[i].render(normal)
            if key is not None:
                return key
        return normal

    return spell
