"""Deploy the backbone: export files (safetensors/torchvision/timm/ONNX), loading, embeddings, search."""
from selfsight.deploy.backbone import FORMATS, export, export_backbone, read_metadata, timm_model, torchvision_model
from selfsight.deploy.embeddings import embed, load_embeddings
from selfsight.deploy.load import Preprocess, load_backbone
from selfsight.deploy.search import cosine_topk, neighbors

__all__ = ["FORMATS", "export", "export_backbone", "read_metadata", "timm_model", "torchvision_model", "embed",
           "load_embeddings", "Preprocess", "load_backbone", "cosine_topk", "neighbors"]

