"""A sentence classifier that mean-pools the encoder's token states (sentence-transformers style).

all-MiniLM-L6-v2 was trained so that the *mean* of its token states (over the attention mask)
is the sentence embedding (Reimers & Gurevych 2019, Sentence-BERT, Sec. 3); its [CLS] state and
pooler were not. A linear head on the mean-pooled state therefore starts from useful sentence
features, which matters under DP-SGD where every step is noisy and local data is small.
Only Linear, Embedding and LayerNorm modules carry parameters, as the DP engines require.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask.

    Parameters
    ----------
    states : torch.Tensor, shape [B, L, H]
    attention_mask : torch.Tensor, shape [B, L] (1 = token, 0 = padding)

    Returns
    -------
    torch.Tensor, shape [B, H]
        Rows with no tokens give zeros.
    """
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class MeanPoolClassifier(nn.Module):
    """encoder -> masked mean over tokens -> dropout -> Linear(hidden, num_labels).

    Parameters
    ----------
    encoder : torch.nn.Module
        A Hugging Face encoder (``AutoModel``) returning ``last_hidden_state`` [B, L, H].
    num_labels : int
    dropout : float
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        self.config = encoder.config
        self.config.num_labels = num_labels

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **_):
        """Return an object with ``logits`` [B, num_labels] (like transformers' outputs)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state
        return SimpleNamespace(logits=self.classifier(self.dropout(masked_mean(states, attention_mask))))
