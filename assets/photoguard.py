"""The PhotoGuard study as an asset group (docs/studies.md): photoguard_models -> photoguard_immunize
-> photoguard_edits -> photoguard_warehouse.  It runs for experiments whose spec has a
``photoguard`` section; for the others its first asset materializes nothing and the rest is
skipped."""
from dagster import (AssetExecutionContext, AssetSelection, MaterializeResult, MetadataValue, Output, asset,
                     define_asset_job)
from dagster_duckdb import DuckDBResource

from assets.common import code_version, experiments_partitions, load_study_warehouse, metadata, png
from assets.sources import source_deps
from ops.tables import markdown
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

# changes when this module or any ops/kernels module it calls changes (assets.common.code_version)
CODE_VERSION = code_version(__name__)

GROUP = "photoguard"


@asset(deps=["loader_files", *source_deps("spec/photoguard")], partitions_def=experiments_partitions,
       group_name=GROUP, kinds={"pytorch", "safetensors"}, code_version=CODE_VERSION, output_required=False)
def photoguard_models(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                      compute: ComputeResource):
    """The editor PhotoGuard immunizes against: a small VAE and a class-conditioned latent
    inpainting UNet (diffusers, DDIM) trained on the training split -- or a diffusers inpainting
    checkpoint on disk (``photoguard.checkpoint``, e.g. Stable Diffusion inpainting) -- and a small
    classifier for FID features and class agreement; reconstruction PSNR and how often generations
    and inpaintings are recognized as their conditioning class."""
    from ops import photoguard

    key = context.partition_key
    spec = experiments.load(key)
    if spec.photoguard is None:
        context.log.info(f"{key}: the spec has no photoguard section; the study does not run")
        return
    s = store.get()
    summary = photoguard.photoguard_models(spec, s, key, compute.torch_device(), context.log.info)
    md = metadata(summary, {"path": s.path(key, photoguard.MODELS)})
    md["table"] = MetadataValue.md(markdown(s.load_table(key, photoguard.MODELS, "photoguard_models.parquet"),
                                            drop=("experiment",), digits=4))
    if s.path(key, photoguard.MODELS, "training.png").exists():
        md["training"] = png(s.path(key, photoguard.MODELS, "training.png"), alt="training losses")
    yield Output(None, metadata=md)


@asset(deps=["photoguard_models"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"pytorch"},
       code_version=CODE_VERSION)
def photoguard_immunize(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                        compute: ComputeResource) -> MaterializeResult:
    """The images (the test split, or the user's folder ``photoguard.images``) immunized three ways
    outside the region the editor repaints: uniform noise at the encoder attack's budget, the
    encoder attack and the diffusion attack; each checked against its budget, seconds per image."""
    from ops import photoguard

    key = context.partition_key
    s = store.get()
    summary = photoguard.photoguard_immunize(experiments.load(key), s, key, compute.torch_device(), context.log.info)
    return MaterializeResult(metadata=metadata(summary, {"path": s.path(key, photoguard.IMMUNIZE)}))


@asset(deps=["photoguard_immunize"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"pytorch"},
       code_version=CODE_VERSION)
def photoguard_edits(context: AssetExecutionContext, experiments: ExperimentsResource, store: ArtifactStoreResource,
                     compute: ComputeResource) -> MaterializeResult:
    """Clean and immunized images edited by the inpainting pipeline with the same noise; each edit
    against the clean image's edit (PSNR, SSIM, FID on the classifier's features, agreement with the
    conditioning class), the paper's ordering noise < encoder < diffusion checked, a grid image."""
    from ops import photoguard

    key = context.partition_key
    s = store.get()
    summary = photoguard.photoguard_edits(experiments.load(key), s, key, compute.torch_device(), context.log.info)
    md = metadata(summary, {"path": s.path(key, photoguard.EDITS)})
    md["table"] = MetadataValue.md(markdown(s.load_table(key, photoguard.EDITS, "photoguard_metrics.parquet"),
                                            drop=("experiment",), digits=4))
    md["ordering_table"] = MetadataValue.md(markdown(s.load_table(key, photoguard.EDITS, "photoguard_ordering.parquet"),
                                               drop=("experiment",), digits=4))
    md["grid"] = png(s.path(key, photoguard.EDITS, "grid.png"), caption=summary["ordering"]["summary"],
                     alt="originals, immunized images and their edits")
    return MaterializeResult(metadata=md)


@asset(deps=["photoguard_edits"], partitions_def=experiments_partitions, group_name=GROUP, kinds={"duckdb"},
       pool="duckdb", code_version=CODE_VERSION)
def photoguard_warehouse(context: AssetExecutionContext, store: ArtifactStoreResource,
                         duckdb: DuckDBResource) -> MaterializeResult:
    """The study's tables (photoguard_models, photoguard_images, photoguard_metrics,
    photoguard_ordering) in the warehouse."""
    from ops import photoguard

    key = context.partition_key
    s = store.get()
    frames = {name: s.load_table(key, photoguard.MODELS if name == "photoguard_models" else photoguard.EDITS,
                                 f"{name}.parquet") for name in photoguard.TABLES}
    return MaterializeResult(metadata=load_study_warehouse(key, s, duckdb.database, photoguard.TABLES, frames))


ASSETS = [photoguard_models, photoguard_immunize, photoguard_edits, photoguard_warehouse]
photoguard_job = define_asset_job("photoguard_job", selection=AssetSelection.groups(GROUP),
                                  description="The PhotoGuard study for one experiment (partition).")
