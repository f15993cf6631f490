from glob import glob

from setuptools import find_packages, setup

setup(
    name="dbot-ds",
    version="0.1.0",
    description="dBOT masked knowledge distillation with bootstrapped teachers, on DeepSpeed",
    packages=find_packages(include=["dbot_ds", "dbot_ds.*", "data_tools", "data_tools.*"]),
    python_requires=">=3.10",
    # No upper pins: the same install must work on a GPU cluster with its own CUDA torch.
    # timm 1.0.23: Beit's shared relative position index is non-persistent (before, timm could
    # not load its own save_for_hf of a BEiT-style encoder, and our exports' keys varied by release)
    install_requires=["torch>=2.4", "torchvision", "timm>=1.0.23", "deepspeed>=0.15", "webdataset",
                      "safetensors", "numpy", "tqdm", "tensorboard", "simplejpeg", "matplotlib"],
    # torchcodec: the preferred JPEG decoder of data.decode=device (torchvision's otherwise)
    extras_require={"dev": ["pytest>=7", "pytest-timeout", "scipy", "scikit-learn", "torchcodec", "wandb"],
                    "gpu": ["torchcodec"], "wandb": ["wandb"]},
    entry_points={"console_scripts": ["dbot-ds=dbot_ds.cli:main"]},
    # Found in the checkout by an editable install, under <prefix>/share/dbot-ds by a regular one.
    data_files=[("share/dbot-ds/ds_configs", glob("ds_configs/*.json")),
                ("share/dbot-ds/slurm", ["slurm/train.sbatch", "slurm/cluster.sh"])],
)
