"""Token-adaptive layer execution over a Hugging Face Llama-family model.

A router on every decoder layer from `first_routed_layer` on decides, per token, whether the layer
runs. A skipped token passes the layer unchanged and its keys/values at that layer are hidden from
every later token (D-LLM's KV mask). Training samples decisions with straight-through Gumbel-softmax;
inference executes iff P(execute) >= theta and runs each layer only on its executed tokens
(gather -> layer -> scatter), with a dense masked path kept as the reference.

The decoder layer's attention is written here (not delegated to HF's layer forward) because the KV
mask, compaction and per-token gates need control over positions and masks; the block around it is
the model family's (`families/`: which norms sit where, RoPE table and window per layer), the
hooks the ONNX lowerings use too. The HF submodules (projections, norms, MLP) are called as they
are, so LoRA (peft) and fake quantization (modelopt) apply unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .families import family
from .stats import ExecutionStats, flop_terms


@dataclass
class RouterConfig:
    first_routed_layer: int = 2
    keep_initial: int = 2  # the first tokens of every sequence always execute (attention sinks)
    router_hidden: int = 64
    execute_bias: float = 2.0  # initial logit margin for "execute": P = sigmoid(2) = 0.88
    tau: float = 1.0  # Gumbel-softmax temperature during training

    def to_dict(self) -> dict:
        return asdict(self)


class Router(nn.Module):
    """D-LLM's decision module: hidden -> r -> RMSNorm -> SiLU -> 2 logits (execute, skip)."""

    def __init__(self, hidden: int, r: int, execute_bias: float, eps: float = 1e-6):
        super().__init__()
        self.down = nn.Linear(hidden, r)
        self.norm = nn.RMSNorm(r, eps=eps)
        self.out = nn.Linear(r, 2)
        nn.init.normal_(self.out.weight, std=0.02)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([execute_bias, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.norm(self.down(x.float()))))


@dataclass
class RoutedOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: list | None = None
    gates: list = field(default_factory=list)  # per routed layer [B, T]; straight-through in training
    router_logits: list = field(default_factory=list)  # per routed layer [B, T, 2]
    valid: torch.Tensor | None = None  # [B, T] bool, real (non-padding) tokens
    hidden: torch.Tensor | None = None  # final-normed hidden states, with hidden_only=True (no logits)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_mask_4d(q_pos, k_pos, k_ok, window: int | None = None) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: causal by original position, only allowed keys (valid and executed)."""
    allowed = k_ok[:, None, None, :] & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    if window:
        allowed &= k_pos[:, None, None, :] > q_pos[:, None, :, None] - window
    # A query with no allowed key (padding, or a skipped token whose output is discarded) would
    # give NaN in softmax; let it see everything, its result is never used.
    return allowed | ~allowed.any(-1, keepdim=True)


class RoutedModel(nn.Module):
    """A causal LM whose decoder layers are skipped per token by trained routers."""

    def __init__(self, base: nn.Module, config: RouterConfig | None = None):
        super().__init__()
        self.base = base
        self.router_config = config or RouterConfig()
        cfg = self.hf_config
        self.family = family(cfg.model_type)  # the block's hooks (families/)
        self.family.check(cfg)
        self.layer_ids = list(range(self.router_config.first_routed_layer, cfg.num_hidden_layers))
        self.routers = nn.ModuleDict({
            str(i): Router(cfg.hidden_size, self.router_config.router_hidden, self.router_config.execute_bias)
            for i in self.layer_ids})
        self.theta = 0.5
        self.theta_table: dict[str, dict] = {}
        self.compact = True  # inference: run layers on executed tokens only
        self.static_skip: frozenset[int] | None = None  # baseline: these layers never run, routers unused
        # provenance, filled by api.new_routed / load_checkpoint and written by checkpoint.save
        self.base_info: dict = {"id": getattr(cfg, "name_or_path", "") or "custom", "sha256": None}
        self.training_info: dict | None = None
        self.recommended: dict | None = None  # {"ratio", "rule", "results"} of a shipped checkpoint
        self.quantization_info: dict | None = None
        self.tokenizer = None
        self.checkpoint_dir = None
        self.reset_stats()

    # ---- structure -------------------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The HF *ForCausalLM module, under a peft wrapper if LoRA is attached."""
        return self.base.get_base_model() if hasattr(self.base, "get_base_model") else self.base

    @property
    def decoder(self) -> nn.Module:
        return self.causal_lm.model

    @property
    def hf_config(self):
        return self.causal_lm.config

    def set_theta(self, theta: float) -> None:
        from .deploy import theta as policy

        self.theta = policy.check_theta(theta)

    def set_ratio(self, ratio: float, mode: str = "exact") -> float:
        """Set theta for `ratio` from the calibrated table (the one policy, theta.py); returns theta."""
        from .deploy import theta as policy

        self.set_theta(policy.theta_for(self.theta_table, ratio, mode))
        return self.theta

    # ---- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        c = self.hf_config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        terms = flop_terms(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, hd,
                           c.intermediate_size, c.vocab_size, self.router_config.router_hidden)
        self.stats = ExecutionStats(self.layer_ids, c.num_hidden_layers, terms)

    def execution_stats(self) -> dict:
        """Accumulated since the last reset_stats(): per-layer executed fraction, overall ratio,
        and routed FLOPs / dense FLOPs (decoder layers with their attention spans, routers, lm_head)."""
        return self.stats.summary()

    # ---- the decoder layer ------------------------------------------------------------------
    def _layer(self, i, layer, x, pos, k_pos, k_ok, past=None):
        """Decoder block i (its family's) on x [B, T, H]; returns (new hidden, (k, v)) with k/v of x."""
        kv = []

        def attend(h):
            o, k, v = self._attention(i, layer.self_attn, h, pos, k_pos, k_ok, past)
            kv.append((k, v))
            return o
        return self.family.block(_LayerOps(layer), x, attend, self.family.activation(self.hf_config)), kv[0]

    def _attention(self, i, attn, h, pos, k_pos, k_ok, past=None):
        """Self-attention of layer i on the normed h [B, T, H]: (o_proj output, k, v of h)."""
        c = self.hf_config
        B, T, _ = h.shape
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        q = attn.q_proj(h).view(B, T, -1, hd)
        k = attn.k_proj(h).view(B, T, -1, hd)
        v = attn.v_proj(h).view(B, T, -1, hd).transpose(1, 2)
        if self.family.qk_norm(attn):  # Qwen3, Gemma 3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.family.rotary(self.decoder.rotary_emb, h, pos, c, i)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        kk, vv = k, v
        if past is not None:
            kk, vv = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        rep = q.shape[1] // kk.shape[1]
        mask = attention_mask_4d(pos, k_pos, k_ok, self._window(i))
        o = F.scaled_dot_product_attention(q, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1),
                                           attn_mask=mask, scale=getattr(attn, "scaling", hd ** -0.5))
        return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1)), k, v

    def _window(self, i: int = 0) -> int | None:
        """Layer i's sliding attention window (None: full attention)."""
        return self.family.window(self.hf_config, i)

    def _compacted_layer(self, i, layer, x, pos, gate, want_kv: bool):
        """Run `layer` on the executed tokens only: gather -> layer -> scatter back."""
        B, T, H = x.shape
        count = gate.sum(1)
        n = max(int(count.max()), 1)
        # stable partition: executed positions first (in order), then skipped ones
        index = torch.argsort((~gate).to(torch.int8), dim=1, stable=True)[:, :n]
        ok = torch.arange(n, device=x.device)[None, :] < count[:, None]
        xc = x.gather(1, index[..., None].expand(B, n, H))
        pc = pos.gather(1, index)
        yc, (kc, vc) = self._layer(i, layer, xc, pc, pc, ok)
        yc = torch.where(ok[..., None], yc, xc)  # padding rows write their own input back
        out = x.scatter(1, index[..., None].expand(B, n, H), yc)
        if not want_kv:
            return out, None
        # cache layout stays full-length: executed rows hold their k/v, skipped rows zeros
        kv = [t.new_zeros(B, t.shape[1], T, t.shape[3]).scatter(
            2, index[:, None, :, None].expand_as(t), torch.where(ok[:, None, :, None], t, 0.0))
            for t in (kc, vc)]
        return out, tuple(kv)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values: list | None = None,
                use_cache: bool = False, theta: float | torch.Tensor | None = None,
                execute_all: bool = False, dense: bool | None = None, hidden_only: bool = False) -> RoutedOutput:
        """HF-style forward. `attention_mask` covers past + current tokens (1 = real token).

        hidden_only: return the final-normed hidden states instead of logits (`.hidden`), so a caller
        that needs a few positions applies `head()` to those only (the LM head is the largest matmul).

        theta: theta override, a float or one per sequence [B]; execute_all: every token runs
        every layer (the all-layers reference); dense: force the masked reference path instead of
        compaction at inference (training always uses the dense path).
        """
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=input_ids.device)
        full_valid = attention_mask.bool()
        full_pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        valid, pos = full_valid[:, past_len:], full_pos[:, past_len:]
        keep = valid & (pos < self.router_config.keep_initial)
        sampling = self.training and not execute_all
        compact = (not self.training) and past_key_values is None and not (dense if dense is not None
                                                                          else not self.compact)
        if theta is None:
            theta = self.theta
        theta = torch.as_tensor(theta, dtype=torch.float32, device=input_ids.device).reshape(-1, 1)
        x = self.decoder.embed_tokens(input_ids)
        presents, gates, router_logits, gates_hard = [], [], [], []
        past_valid = past_exec = None
        if past_key_values:  # for FLOP accounting: real cached tokens, executed cached keys
            past_valid = full_valid[:, :past_len].sum(1)
            past_exec = [past_key_values[i][2].sum(1) for i in self.layer_ids]
        for i, layer in enumerate(self.decoder.layers):
            past = past_key_values[i] if past_key_values else None
            routed = str(i) in self.routers
            if not routed:
                gate = valid
                g = None
            else:
                logits = self.routers[str(i)](x)
                router_logits.append(logits)
                g = self._decide(i, logits, theta, keep, valid, sampling, execute_all)
                gate = g.detach().bool()
                gates.append(g)
                gates_hard.append(gate)
            if compact and routed:
                x, kv = self._compacted_layer(i, layer, x, pos, gate, use_cache)
            else:
                k_ok = gate if past is None else torch.cat([past[2] & full_valid[:, :past_len], gate], 1)
                k_pos = pos if past is None else full_pos
                y, kv = self._layer(i, layer, x, pos, k_pos, k_ok, past)
                if g is None:
                    x = y
                elif sampling:
                    x = x + g[..., None].to(x.dtype) * (y - x)  # straight-through: value 0/1, soft grad
                else:
                    x = torch.where(gate[..., None], y, x)
                if routed:  # cache rows of skipped tokens are zeros, as in the compacted path
                    kv = tuple(t * gate[:, None, :, None].to(t.dtype) for t in kv)
                if past is not None:
                    kv = (torch.cat([past[0], kv[0]], 2), torch.cat([past[1], kv[1]], 2))
            if use_cache:
                exec_mask = gate if past is None else torch.cat([past[2], gate], 1)
                presents.append((kv[0], kv[1], exec_mask))
        hidden = self.decoder.norm(x)
        logits = None if hidden_only else self.causal_lm.lm_head(hidden)
        cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
        self.stats.add(cpu(valid), [cpu(g) for g in gates_hard],
                       None if past_valid is None else cpu(past_valid),
                       None if past_exec is None else [cpu(p) for p in past_exec])
        loss = None
        if labels is not None and logits is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return RoutedOutput(logits=logits, loss=loss, past_key_values=presents if use_cache else None,
                            gates=gates, router_logits=router_logits, valid=valid,
                            hidden=hidden if hidden_only else None)

    def _decide(self, i, logits, theta, keep, valid, sampling: bool, execute_all: bool) -> torch.Tensor:
        """Router i's execute decisions [B, T] (float 0/1; straight-through Gumbel in training), with
        the first `keep_initial` tokens forced on and padding off."""
        B, T = valid.shape
        if execute_all:
            g = torch.ones(B, T, device=logits.device)
        elif self.static_skip is not None:
            g = torch.full((B, T), float(i not in self.static_skip), device=logits.device)
        elif sampling:
            g = F.gumbel_softmax(logits, tau=self.router_config.tau, hard=True)[..., 0]
        else:
            g = (logits.softmax(-1)[..., 0] >= theta).float()
        return torch.where(keep, torch.ones_like(g), g) * valid

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final-normed hidden states (any leading shape)."""
        return self.causal_lm.lm_head(hidden)

    # ---- persistence helpers -----------------------------------------------------------------
    def router_state(self) -> dict[str, torch.Tensor]:
        """Full router tensors (gathered from shards under FSDP: a collective there)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
                for k, v in self.routers.state_dict().items()}


class _LayerOps:
    """The vocabulary of a family's `block` (families/llama.py) on an HF decoder layer: its own
    norm and MLP modules (which apply the activation the family names)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def norm(self, x, name):
        return getattr(self.layer, name)(x)

    def add(self, x, y):
        return x + y

    def mlp(self, h, act):
        return self.layer.mlp(h)
