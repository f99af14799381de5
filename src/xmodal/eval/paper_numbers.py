"""The paper's reported numbers (Tables 1-4), transcribed from its Sec. 4.

All accuracies / mIoUs are in percent, as printed; distances (Table 1 mPD)
are raw Euclidean feature distances. "CM" rows are networks trained with the
cross-modality loss only, "CM-CV" rows with both losses (the full method).
Tables 1-3 are on ModelNet40 (Table 1 also on ModelNet10); Table 4 on
ShapeNet-Part. The numbers are only comparable with runs on the same data.
"""

from __future__ import annotations

__all__ = ["TABLE1", "TABLE2", "TABLE3", "TABLE3_KS", "TABLE4", "TABLE4_ROWS"]

#: Table 1 — pretext task: cross-modality accuracy (%) and cross-view mean pair distance (std)
TABLE1 = {
    "ModelNet40": {
        "CM": {"cm_accuracy": 93.5, "cv_pos_mean": 6.43, "cv_pos_std": 2.38, "cv_neg_mean": 12.07, "cv_neg_std": 3.46},
        "CM-CV": {"cm_accuracy": 91.8, "cv_pos_mean": 2.56, "cv_pos_std": 0.56, "cv_neg_mean": 4.33, "cv_neg_std": 1.37},
    },
    "ModelNet10": {
        "CM": {"cm_accuracy": 92.0, "cv_pos_mean": 6.83, "cv_pos_std": 2.36, "cv_neg_mean": 11.29, "cv_neg_std": 3.15},
        "CM-CV": {"cm_accuracy": 91.5, "cv_pos_mean": 2.571, "cv_pos_std": 0.52, "cv_neg_mean": 4.304, "cv_neg_std": 1.06},
    },
}

#: Table 2 — linear-SVM recognition accuracy (%) on ModelNet40; 2D keyed by #views
TABLE2 = {
    "svm2d": {"CM": {1: 66.1}, "CM-CV": {1: 72.5, 12: 87.3, 36: 88.7, 80: 89.3}},
    "svm3d": {"CM": 87.5, "CM-CV": 89.8},
}

#: the K of Table 3's top-K columns
TABLE3_KS = (1, 5, 10, 20, 50)

#: Table 3 — retrieval top-K accuracy (%) on ModelNet40, one value per K in TABLE3_KS
TABLE3 = {
    "retrieval3d": {
        "CM": (82.9, 94.2, 96.0, 97.8, 98.7),
        "CM-CV": (84.0, 94.3, 96.5, 97.9, 98.8),
    },
    "retrieval2d": {
        1: {
            "ImageNet": (61.4, 82.1, 88.5, 93.5, 97.3),
            "CM": (54.6, 79.2, 87.1, 93.0, 97.1),
            "CM-CV": (66.9, 85.8, 91.1, 94.5, 97.9),
        },
        12: {
            "ImageNet": (83.6, 94.7, 96.7, 98.0, 99.3),
            "CM": (75.5, 91.2, 95.0, 97.2, 98.4),
            "CM-CV": (83.5, 94.2, 96.2, 97.5, 99.0),
        },
        80: {
            "ImageNet": (87.6, 95.7, 97.4, 98.7, 99.4),
            "CM": (82.7, 93.9, 96.4, 97.6, 98.9),
            "CM-CV": (84.7, 94.7, 96.6, 97.9, 99.2),
        },
    },
}

#: Table 4 row names in the paper's order
TABLE4_ROWS = ("CM-Frozen", "CM-CV-Frozen", "Supervised", "CM-Unfrozen", "CM-CV-Unfrozen")

#: Table 4 — ShapeNet-Part segmentation: {training data %: {row: (OA, class mIoU, instance mIoU)}} in %
TABLE4 = {
    100: {
        "CM-Frozen": (90.8, 71.2, 78.6),
        "CM-CV-Frozen": (92.1, 74.7, 80.8),
        "Supervised": (92.9, 77.6, 83.0),
        "CM-Unfrozen": (93.2, 78.1, 83.4),
        "CM-CV-Unfrozen": (93.4, 79.1, 83.7),
    },
    20: {
        "CM-Frozen": (89.2, 65.6, 75.4),
        "CM-CV-Frozen": (90.7, 68.5, 77.8),
        "Supervised": (90.9, 69.9, 79.1),
        "CM-Unfrozen": (91.3, 70.9, 80.0),
        "CM-CV-Unfrozen": (91.8, 72.2, 80.3),
    },
    2: {
        "CM-Frozen": (85.1, 57.1, 69.2),
        "CM-CV-Frozen": (87.3, 58.4, 72.1),
        "Supervised": (85.0, 56.2, 69.0),
        "CM-Unfrozen": (87.2, 60.6, 72.6),
        "CM-CV-Unfrozen": (88.3, 60.7, 74.0),
    },
}
