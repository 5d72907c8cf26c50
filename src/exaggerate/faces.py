"""Face identity for face datasets (extra 'faces'): FVA and FS with dlib's ResNet descriptor.

Two faces are the same person when their descriptors are closer than 0.6 (dlib's threshold).
FVA: share of (query, counterfactual) pairs verified as the same person; FS: mean cosine
similarity of their descriptors.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SAME_PERSON_DISTANCE = 0.6


@lru_cache(maxsize=1)
def _models():
    import dlib
    import face_recognition_models as frm

    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
            dlib.face_recognition_model_v1(frm.face_recognition_model_location()), dlib)


def to_uint8_rgb(x: torch.Tensor) -> np.ndarray:
    """CxHxW in [-1, 1] -> HxWx3 uint8."""
    a = ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if a.shape[0] == 1:
        a = a.expand(3, -1, -1)
    return np.ascontiguousarray(a.permute(1, 2, 0).numpy())


def descriptor(image: np.ndarray) -> np.ndarray:
    """128-d descriptor of the largest detected face; aligned crops with no detection use the
    whole image as the face box."""
    detector, shape_predictor, encoder, dlib = _models()
    boxes = detector(image, 1)
    box = max(boxes, key=lambda r: r.area()) if len(boxes) else dlib.rectangle(0, 0, image.shape[1] - 1,
                                                                                image.shape[0] - 1)
    return np.array(encoder.compute_face_descriptor(image, shape_predictor(image, box)))


def face_verification(x: torch.Tensor, x_cf: torch.Tensor) -> dict:
    dist, sims = [], []
    for a, b in zip(x, x_cf):
        da, db = descriptor(to_uint8_rgb(a)), descriptor(to_uint8_rgb(b))
        dist.append(float(np.linalg.norm(da - db)))
        sims.append(float(da @ db / (np.linalg.norm(da) * np.linalg.norm(db))))
    dist = np.array(dist)
    return {"fva": float((dist < SAME_PERSON_DISTANCE).mean()), "fs": float(np.mean(sims)),
            "face_distance": float(dist.mean())}
