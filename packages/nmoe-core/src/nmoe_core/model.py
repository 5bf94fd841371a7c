"""The MoE transformer (inventory section 2): single-device model code.

Letters: B batch, S sequence, D model width, V vocabulary, T = B*S tokens.

Layout: token embedding -> ``n_layers`` pre-norm blocks (attention, then a dense SwiGLU MLP for the
first ``moe.n_dense_layers`` blocks and an `MoE` for the rest) -> RMSNorm -> untied lm head, with
the chunked cross-entropy of `nmoe_core.loss` (full ``[T, V]`` logits are never built) and an
optional DeepSeek-V3 multi-token-prediction head (`MTPModule`, shared embedding and head).

Parallelism is applied from outside: expert-parallel training builds the model with its
``ep_rank``/``ep_world_size`` (each rank holds its slice of the experts) and attaches dispatchers
with `Transformer.set_dispatchers`; data parallelism wraps the optimizer step.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nmoe_comm import Dispatcher
from nmoe_core.attention import KVCache, LayerCache, build_attention
from nmoe_core.config import ModelConfig
from nmoe_core.loss import chunked_cross_entropy
from nmoe_core.mlp import MLP
from nmoe_core.moe import GroupedExperts, MoE, Router, parallel_init, trunc_normal_
from nmoe_core.norm import RMSNorm


@dataclass
class ModelOutput:
    """What `Transformer.forward` returns.

    Attributes:
        hidden: ``[B, S, D]`` final hidden states after the last norm (feed `Transformer.logits`).
        loss: scalar training loss ``lm_loss + mtp_weight * mtp_loss + aux_alpha * aux_loss``
            (None without targets).
        lm_loss: mean next-token cross-entropy over counted targets.
        lm_loss_sum: float32 summed next-token cross-entropy; ``num_targets`` rows counted.
        mtp_loss: mean over MTP depths of each depth's summed CE divided by ``B*S`` (None when
            MTP is off).
        aux_loss: mean over MoE layers of the Switch balance loss (None when its alpha is 0).
    """

    hidden: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += ffn(norm(x))``.

    Args:
        cfg: the model config.
        layer_id: block index (selects global/local attention and dense/MoE feed-forward).
        ep_rank, ep_world_size: expert-parallel place (MoE blocks only).
        force_dense_global: build a global-attention dense block (the MTP block).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        ep_rank: int = 0,
        ep_world_size: int = 1,
        force_dense_global: bool = False,
    ):
        super().__init__()
        att = cfg.attention
        self.layer_id = layer_id
        is_global = force_dense_global or att.is_global(layer_id, cfg.n_layers)
        kind = att.kind if is_global else att.local_kind
        window = None if is_global else att.local_window
        self.attn_kind = kind
        self.window = window
        self.attn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.attn = build_attention(kind, cfg.dim, att, cfg.head_dim, window, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        if force_dense_global or layer_id < cfg.moe.n_dense_layers:
            self.ffn: nn.Module = MLP(cfg.dim, cfg.inter_dim)
        else:
            self.ffn = MoE(cfg, layer_id, ep_rank, ep_world_size)

        # `attention_half` compiled by `Transformer.compile_regions` (None: eager).
        self.compiled_attention_half: Callable | None = None

    def attention_half(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = x + attn(attn_norm(x))`` and the feed-forward's input ``ffn_norm(h)``, without a
        cache at position 0 (training and scoring): the block up to its feed-forward, which is
        plain tensor code (the region `Transformer.compile_regions` compiles)."""
        h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return h_BSD, self.ffn_norm(h_BSD)

    def forward(
        self, x_BSD: torch.Tensor, start_pos: int = 0, cache: LayerCache | None = None
    ) -> torch.Tensor:
        if cache is None and start_pos == 0:
            x_BSD, normed_BSD = (self.compiled_attention_half or self.attention_half)(x_BSD)
        else:
            x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), start_pos, cache)
            normed_BSD = self.ffn_norm(x_BSD)
        return x_BSD + self.ffn(normed_BSD)


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 eq. 21-24; inventory 2.6).

    ``h' = block(proj([norm_h(h); norm_e(embed(next tokens))]))``; logits come from the shared
    head applied to ``norm(h')``.
    """

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.h_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.e_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, cfg.n_layers + depth, force_dense_global=True)
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor) -> torch.Tensor:
        x = self.proj(torch.cat([self.h_norm(h_BSD), self.e_norm(emb_BSD)], dim=-1))
        return self.block(x)


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class Transformer(nn.Module):
    """The MoE language model.

    Args:
        cfg: validated `ModelConfig`.
        ep_rank, ep_world_size: expert-parallel place of this replica (default: all experts here).
        seed: initialisation seed. Initialisation depends only on ``(cfg, seed)``: every tensor
            draws from its own generator keyed by its name (experts by their global id), so the
            result is the same on any device, rank layout or global RNG state.
        init: run `init_weights`. ``False`` leaves torch's default initialisation, for callers
            that load every weight right after (checkpoint loading builds the model under
            ``torch.device("cuda")`` this way instead of drawing billions of values on the CPU).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        ep_rank: int = 0,
        ep_world_size: int = 1,
        seed: int = 0,
        init: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.ep_rank, self.ep_world_size = ep_rank, ep_world_size
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, i, ep_rank, ep_world_size) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, d) for d in range(cfg.mtp_depth))
        self.ignore_index = cfg.eos_token_id if cfg.loss_mask_eos else -100
        # Bytes of softmax probabilities the loss may keep from forward to backward instead of
        # recomputing the logits (`nmoe_core.loss`); a memory/speed trade set by the runtime.
        self.loss_keep_bytes = 0
        if init:
            self.init_weights(seed)

    # ----------------------------------------------------------------------------------------
    # Initialisation (inventory 2.2)

    def _block_std(self, layer_id: int) -> float:
        return self.cfg.init_std / math.sqrt(2 * (layer_id + 1))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Embedding N(0, init_std); input projections truncated-normal(init_std); output
        projections (attention ``wo``, MLP ``w2``, experts, router) truncated-normal with
        ``init_std / sqrt(2 (layer + 1))``; norms 1; head truncated-normal ``dim^-0.5``."""
        std = self.cfg.init_std
        out_std: dict[int, float] = {}
        expert_modules: set[int] = set()
        for module in self.modules():
            if isinstance(module, Block):
                block_std = self._block_std(module.layer_id)
                for sub in module.modules():
                    if hasattr(sub, "output_projections"):
                        for lin in sub.output_projections():
                            out_std[id(lin.weight)] = block_std
                    if isinstance(sub, Router):
                        out_std[id(sub.weight)] = block_std
                    if isinstance(sub, GroupedExperts):
                        sub.reset_parameters(seed, module.layer_id, block_std, block_std)
                        expert_modules.update((id(sub.w13), id(sub.w2)))
        def init_param(named: tuple[str, nn.Parameter]) -> None:
            name, param = named
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
            value = torch.empty(param.shape)
            if param is self.embed.weight:
                nn.init.normal_(value, std=std, generator=gen)
            elif param is self.head.weight:
                trunc_normal_(value, self.cfg.dim**-0.5, gen)
            elif param.dim() == 1:
                value.fill_(1.0)
            else:
                trunc_normal_(value, out_std.get(id(param), std), gen)
            param.copy_(value)

        parallel_init(init_param, [(name, param) for name, param in self.named_parameters()
                                   if id(param) not in expert_modules])

    # ----------------------------------------------------------------------------------------
    # Regional compilation

    def compile_regions(self, **compile_kwargs) -> list[str]:
        """``torch.compile`` the model's plain tensor regions, in place; returns their names.

        The regions: each block's attention half (norm, projections, rotary embedding,
        attention, residual add and the feed-forward's norm: `Block.attention_half`), each dense
        or shared-expert MLP, and each MoE router. The routed experts (dispatch, grouped GEMMs,
        combine), the loss and the cached decoding path stay eager. Fusing the regions' casts,
        norms, rotary arithmetic and residual adds removes most of the elementwise passes a
        step makes outside the expert kernels; inside a region the arithmetic may keep float32
        where eager rounds an intermediate to bfloat16, so results differ from eager in the
        last bits. Parameters, buffers and the state dict are untouched.

        Every block shares one compiled code object per region kind (torch inlines modules and
        passes their parameters as inputs), so the recompile limit is raised to cover one entry
        per block and shape in case guards separate them.
        """
        import torch._dynamo

        blocks = [*self.layers, *(module.block for module in self.mtp)]
        limit = 4 * (len(blocks) + 1)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name),
                                                        limit))
        names = []
        for block in blocks:
            block.compiled_attention_half = torch.compile(block.attention_half, **compile_kwargs)
            names.append(f"block {block.layer_id} attention half")
            mlps = [block.ffn] if isinstance(block.ffn, MLP) else []
            if isinstance(block.ffn, MoE):
                block.ffn.router.compile(**compile_kwargs)
                names.append(f"block {block.layer_id} router")
                mlps += [block.ffn.shared] if block.ffn.shared is not None else []
            for mlp in mlps:
                mlp.compile(**compile_kwargs)
                names.append(f"block {block.layer_id} mlp")
        return names

    # ----------------------------------------------------------------------------------------
    # Structure queries used by training and optimizers

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def set_dispatchers(self, factory: Callable[[MoE], Dispatcher]) -> None:
        """Attach ``factory(layer)`` as the dispatcher of every MoE layer."""
        for layer in self.moe_layers():
            layer.set_dispatcher(factory(layer))

    def param_kinds(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by optimizer kind: ``matrix`` (2D hidden weights), ``expert`` (3D stacks),
        ``router``, ``embedding``, ``head``, ``vector`` (norm gains and other 1D tensors)."""
        special: dict[int, str] = {id(self.embed.weight): "embedding", id(self.head.weight): "head"}
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                special[id(module.w13)] = special[id(module.w2)] = "expert"
            elif isinstance(module, Router):
                special[id(module.weight)] = "router"
        kinds: dict[str, list[tuple[str, nn.Parameter]]] = {
            k: [] for k in ("matrix", "expert", "router", "embedding", "head", "vector")
        }
        for name, param in self.named_parameters():
            kind = special.get(id(param), "matrix" if param.dim() >= 2 else "vector")
            kinds[kind].append((name, param))
        return kinds

    def router_loads(self) -> torch.Tensor:
        """int64 ``[n_moe_layers, E]`` rows routed per expert since the last bias update."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0, dtype=torch.int64)
        return torch.stack([layer.load_counts for layer in layers])

    def update_router_biases(self, loads_LE: torch.Tensor, rate: float) -> None:
        """One loss-free balancing step per MoE layer from ``loads_LE`` (summed over ranks)."""
        for layer, load in zip(self.moe_layers(), loads_LE, strict=True):
            layer.update_router_bias(load, rate)

    def num_params(self) -> dict[str, int]:
        """``total`` parameters held here and ``active`` per token (top-k of the routed experts,
        counted over the whole expert-parallel group), with and without the embedding."""
        total = sum(p.numel() for p in self.parameters())
        expert_local = sum(
            p.numel() for layer in self.moe_layers() for p in layer.experts.parameters()
        )
        moe = self.cfg.moe
        expert_global = expert_local * self.ep_world_size
        active_expert = expert_global * moe.n_activated_experts // moe.n_routed_experts
        dense = total - expert_local
        return {
            "total": dense + expert_global,
            "active": dense + active_expert,
            "embedding": self.embed.weight.numel(),
        }

    # ----------------------------------------------------------------------------------------
    # Forward

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits ``hidden @ head.T`` (decoding a few positions; training never calls it)."""
        return self.head(hidden)

    def _loss_inputs(self, hidden_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.head.weight
        dtype = _compute_dtype(hidden_ND.device)
        if dtype is not None:
            return hidden_ND.to(dtype), weight.to(dtype)
        return hidden_ND, weight.to(hidden_ND.dtype)

    def _mtp_loss(
        self, h_BSD: torch.Tensor, targets_BS: torch.Tensor
    ) -> torch.Tensor:
        batch, seq = targets_BS.shape
        losses = []
        for depth, module in enumerate(self.mtp):
            length = seq - depth - 1
            if length <= 0:
                break
            emb = self.embed(targets_BS[:, depth : depth + length])
            h_BSD = module(h_BSD[:, :length], emb)
            labels = targets_BS[:, depth + 1 : depth + 1 + length]
            hid, w = self._loss_inputs(module.norm(h_BSD).reshape(-1, h_BSD.shape[-1]))
            loss_sum, _ = chunked_cross_entropy(
                hid, w, labels.reshape(-1), self.ignore_index, self.cfg.loss_chunk_size,
                self.loss_keep_bytes,
            )
            losses.append(loss_sum / (batch * seq))
        if not losses:
            return h_BSD.new_zeros((), dtype=torch.float32)
        return torch.stack(losses).mean()

    def forward(
        self,
        tokens_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        *,
        start_pos: int = 0,
        cache: KVCache | None = None,
        mtp_weight: float | None = None,
    ) -> ModelOutput:
        """Run the model.

        Args:
            tokens_BS: int64 ``[B, S]`` input ids.
            targets_BS: int64 ``[B, S]`` next-token ids (usually ``tokens`` shifted by one), or
                None to return only hidden states. Targets equal to the ignore index (``eos``
                with ``loss_mask_eos``, else -100) are not counted.
            start_pos: absolute position of ``tokens_BS[:, 0]`` (incremental decoding); with a
                left-padded cache (``KVCache(..., pad_lengths_B)``) the cache slot, padding
                included.
            cache: a `KVCache` to read and extend (decoding); MTP is skipped when given.
            mtp_weight: lambda for the MTP loss; defaults to ``cfg.mtp_lambda``.
        """
        if tokens_BS.dim() != 2:
            raise ValueError(f"tokens_BS must be [B, S], got {tuple(tokens_BS.shape)}")
        h = self.embed(tokens_BS)
        for i, block in enumerate(self.layers):
            h = block(h, start_pos, cache.layers[i] if cache is not None else None)
        hidden = self.norm(h)
        out = ModelOutput(hidden=hidden)
        if targets_BS is None:
            return out
        if targets_BS.shape != tokens_BS.shape:
            raise ValueError(
                f"targets_BS {tuple(targets_BS.shape)} must match tokens_BS "
                f"{tuple(tokens_BS.shape)}"
            )
        hid, weight = self._loss_inputs(hidden.reshape(-1, hidden.shape[-1]))
        loss_sum, count = chunked_cross_entropy(
            hid, weight, targets_BS.reshape(-1), self.ignore_index, self.cfg.loss_chunk_size,
            self.loss_keep_bytes,
        )
        out.lm_loss_sum, out.num_targets = loss_sum, count
        out.lm_loss = loss_sum / count.clamp_min(1)
        loss = out.lm_loss
        if len(self.mtp) and cache is None:
            out.mtp_loss = self._mtp_loss(h, targets_BS)
            weight_mtp = self.cfg.mtp_lambda if mtp_weight is None else mtp_weight
            loss = loss + weight_mtp * out.mtp_loss
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if aux and self.training:
            out.aux_loss = torch.stack(aux).mean()
            loss = loss + self.cfg.moe.aux_loss_alpha * out.aux_loss
        out.loss = loss
        return out
