"""Real models from torchvision, timm and Hugging Face transformers at random initialisation
(nothing downloaded), small enough for the CPU: the factories ``tests/test_ecosystem.py`` and
the docs' ``--model-file`` examples use. Each factory seeds itself, so two calls build the same
weights. ``INPUTS`` gives each factory's ``--input-shape``."""

from __future__ import annotations

import torch

INPUTS = {
    "tv_resnet18": "3,32,32",
    "tv_resnet50": "3,32,32",
    "tv_mobilenet_v3_small": "3,32,32",
    "tv_vit": "3,32,32",
    "timm_resnet18": "3,32,32",
    "timm_convnext": "3,32,32",
    "timm_vit": "3,32,32",
    "hf_bert": "tokens:16",
    "hf_gpt2": "tokens:16",
    "hf_llama": "tokens:16",
}


def tv_resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def tv_resnet50():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(num_classes=10)


def tv_mobilenet_v3_small():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10)


def tv_vit():
    """torchvision's VisionTransformer class (the one behind vit_b_16), 2 layers, width 32."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


def timm_resnet18():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10)


def timm_convnext():
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", num_classes=10)


def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             num_classes=10)


def hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config)


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config)
