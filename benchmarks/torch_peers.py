"""The PyTorch peers of storygen's model: the same architecture from torch.nn layers, its training
step and a greedy decoder with a key/value cache.

`TorchStoryTransformer` mirrors `components.model.StoryTransformer` layer for layer: learned
token + position embeddings, pre-norm `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer`
blocks (ReLU feed-forward, biases everywhere, layer-norm epsilon 1e-5), a final layer norm on
each side and output logits tied to the decoder's token embedding. The prompt's padding is
masked in the encoder and in cross-attention; the decoder's self-attention is causal.

Only `python -m benchmarks.run` and tests/benchmarks_test.py import this module, and only
when torch is installed (`pip install -e '.[bench]'`).
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

from components.common import BOS_ID, PAD_ID
from components.config import TrainingConfig

TRAINING = TrainingConfig()  # the defaults of storygen's trainer, which the training step mirrors


class TorchStoryTransformer(nn.Module):
    """Prompt ids [B, S] and decoder ids [B, T] (int64) -> next-token logits [B, T, vocab_size]."""

    def __init__(self, vocab_size, max_prompt_tokens, max_story_tokens, d_model, num_layers, num_heads, ff_dim,
                 dropout=0.0):
        super().__init__()
        self.vocab_size, self.d_model, self.num_heads = vocab_size, d_model, num_heads
        self.encoder_token = nn.Embedding(vocab_size, d_model)
        self.encoder_position = nn.Embedding(max_prompt_tokens, d_model)
        self.decoder_token = nn.Embedding(vocab_size, d_model)  # tied: also the output projection
        self.decoder_position = nn.Embedding(max_story_tokens, d_model)
        layer_args = dict(d_model=d_model, nhead=num_heads, dim_feedforward=ff_dim, dropout=dropout,
                          activation="relu", layer_norm_eps=1e-5, batch_first=True, norm_first=True)
        self.encoder_layers = nn.ModuleList(nn.TransformerEncoderLayer(**layer_args) for _ in range(num_layers))
        self.decoder_layers = nn.ModuleList(nn.TransformerDecoderLayer(**layer_args) for _ in range(num_layers))
        self.encoder_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.decoder_norm = nn.LayerNorm(d_model, eps=1e-5)
        for embedding in (self.encoder_token, self.encoder_position, self.decoder_token, self.decoder_position):
            nn.init.normal_(embedding.weight, std=0.02)

    def encode(self, encoder_ids):
        """Encoder states [B, S, d] and the prompt's padding mask [B, S] (True: padding)."""
        padding = encoder_ids == PAD_ID
        positions = torch.arange(encoder_ids.shape[1], device=encoder_ids.device)
        x = self.encoder_token(encoder_ids) + self.encoder_position(positions)
        for layer in self.encoder_layers:
            x = layer(x, src_key_padding_mask=padding)
        return self.encoder_norm(x), padding

    def decode(self, decoder_ids, states, padding):
        length = decoder_ids.shape[1]
        positions = torch.arange(length, device=decoder_ids.device)
        x = self.decoder_token(decoder_ids) + self.decoder_position(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        for layer in self.decoder_layers:
            x = layer(x, states, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=padding)
        return self.logits(x)

    def logits(self, x):
        return F.linear(self.decoder_norm(x), self.decoder_token.weight)

    def forward(self, encoder_ids, decoder_ids):
        states, padding = self.encode(encoder_ids)
        return self.decode(decoder_ids, states, padding)


def make_model(config: dict) -> TorchStoryTransformer:
    """The peer of StoryTransformer(**config) (storygen's model_config keys)."""
    return TorchStoryTransformer(**{k: config[k] for k in ("vocab_size", "max_prompt_tokens", "max_story_tokens",
                                                           "d_model", "num_layers", "num_heads", "ff_dim")},
                                 dropout=config.get("dropout", 0.0))


def make_optimizer(model, learning_rate=TRAINING.learning_rate, weight_decay=TRAINING.weight_decay):
    """AdamW as storygen's trainer has it: biases, norms and embeddings are not decayed. Fused (one
    kernel for all parameters), PyTorch's fastest AdamW on CPU."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if parameter.ndim == 2 and "token" not in name and "position" not in name else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=learning_rate)


def token_loss_sum(logits, targets):
    """Summed cross-entropy over non-padding targets (in float32), and their count."""
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=PAD_ID, reduction="sum")
    return loss_sum, (targets != PAD_ID).sum()


class TrainStep:
    """One optimizer step per call, as storygen's trainer does it: mean loss over the batch's
    non-padding target tokens, gradients clipped to a global norm, AdamW.

    compile: torch.compile the forward pass and loss (AOTAutograd compiles the backward too;
    shapes become dynamic after the second distinct one, as by default); bf16: autocast to
    bfloat16 on the CPU (weights and optimizer stay float32, like Keras' mixed_bfloat16).
    """

    def __init__(self, model, *, compile: bool = False, bf16: bool = False, clip_norm: float = TRAINING.clip_norm,
                 learning_rate: float = TRAINING.learning_rate):
        self.model = model.train()
        self.optimizer = make_optimizer(model, learning_rate)
        self.bf16, self.clip_norm = bf16, clip_norm
        self.loss = torch.compile(self._loss, dynamic=True) if compile else self._loss

    def _loss(self, encoder_ids, decoder_ids, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(encoder_ids, decoder_ids)
        loss_sum, tokens = token_loss_sum(logits, targets)
        return loss_sum / tokens.clamp(min=1), loss_sum, tokens

    def __call__(self, encoder_ids, decoder_ids, targets):
        """(loss sum, tokens, gradient norm) as Python numbers (the trainer fetches them too)."""
        loss, loss_sum, tokens = self.loss(encoder_ids, decoder_ids, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        return float(loss_sum.detach()), int(tokens), float(norm)


# ---------------------------------------------------------------------- greedy decoding


def _heads(x, num_heads):
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge(x):
    batch, heads, length, depth = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * depth)


class CachedDecoder:
    """Greedy decoding with a key/value cache, from a TorchStoryTransformer's own weights.

    nn.TransformerDecoderLayer has no cache, so each step re-does its three sublayers by hand
    for one new position: self-attention over a preallocated key/value cache, cross-attention
    over keys/values of the prompt computed once, and the feed-forward block.
    """

    def __init__(self, model: TorchStoryTransformer):
        self.model = model.eval()

    @torch.inference_mode()
    def generate(self, encoder_ids, new_tokens: int):
        """Token ids [B, new_tokens] after BOS, greedy, no early stop."""
        model, heads = self.model, self.model.num_heads
        batch = encoder_ids.shape[0]
        states, padding = model.encode(encoder_ids)
        attend = (~padding)[:, None, None, :]  # SDPA's boolean mask: True where attention may look
        d = model.d_model
        caches, cross = [], []
        for layer in model.decoder_layers:
            w, b = layer.multihead_attn.in_proj_weight, layer.multihead_attn.in_proj_bias
            cross.append((_heads(F.linear(states, w[d:2 * d], b[d:2 * d]), heads),
                          _heads(F.linear(states, w[2 * d:], b[2 * d:]), heads)))
            shape = (batch, heads, new_tokens, d // heads)
            caches.append((states.new_empty(shape), states.new_empty(shape)))
        token = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=encoder_ids.device)
        out = torch.empty((batch, new_tokens), dtype=torch.long, device=encoder_ids.device)
        for t in range(new_tokens):
            x = model.decoder_token(token) + model.decoder_position.weight[t]
            for layer, (keys, values), (cross_keys, cross_values) in zip(model.decoder_layers, caches, cross):
                attention = layer.self_attn
                q, k, v = F.linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
                keys[:, :, t:t + 1] = _heads(k, heads)
                values[:, :, t:t + 1] = _heads(v, heads)
                h = F.scaled_dot_product_attention(_heads(q, heads), keys[:, :, :t + 1], values[:, :, :t + 1])
                x = x + attention.out_proj(_merge(h))
                attention = layer.multihead_attn
                q = F.linear(layer.norm2(x), attention.in_proj_weight[:d], attention.in_proj_bias[:d])
                h = F.scaled_dot_product_attention(_heads(q, heads), cross_keys, cross_values, attn_mask=attend)
                x = x + attention.out_proj(_merge(h))
                x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
            token = model.logits(x)[:, -1].argmax(-1, keepdim=True)
            out[:, t:t + 1] = token
        return out


@torch.inference_mode()
def greedy_recompute(model: TorchStoryTransformer, encoder_ids, new_tokens: int):
    """The same greedy decoding without a cache: the whole prefix is re-decoded at every step."""
    model.eval()
    states, padding = model.encode(encoder_ids)
    tokens = torch.full((encoder_ids.shape[0], 1), BOS_ID, dtype=torch.long, device=encoder_ids.device)
    for _ in range(new_tokens):
        next_token = model.decode(tokens, states, padding)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[:, 1:]


def matmul_flops_per_second(n: int = 2048, dtype=torch.float32, seconds: float = 1.0) -> float:
    """Best FLOP/s of an [n, n] x [n, n] matmul over about `seconds`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


__all__ = ["TorchStoryTransformer", "make_model", "TrainStep", "CachedDecoder", "greedy_recompute",
           "matmul_flops_per_second"]
