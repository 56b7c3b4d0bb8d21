"""What a real fine-tune needs where no weights or data sets can be downloaded: a tiny, randomly initialised Llama
with a peft LoRA adapter, and token data it can learn. Shared by the training tests and
benchmarks/callback_cost_bench.py."""

import peft
import torch
import transformers


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with a learnable pattern (each row counts upward from a random start)."""

    def __init__(self, rows: int, length: int = 16, vocab: int = 64, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (rows, 1), generator=generator)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def tiny_lora_model():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(base, lora)
