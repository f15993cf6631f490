"""The image normalisations teachers and students were trained with (mean, std per RGB channel)."""

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # OpenAI CLIP
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's augreg ViTs (IMAGENET_INCEPTION_MEAN/STD)
INPUT_NORMS = {"imagenet": IMAGENET, "clip": CLIP, "inception": INCEPTION}
STUDENT_NORM = "imagenet"  # the loader's images; a teacher trained otherwise renormalises them
