"""The model architectures a spec may name; torch-free, so checking a spec stays cheap (the
sensor checks every spec on every tick)."""

ARCHS = ("logreg", "mlp", "small_cnn", "resnet9")
TORCHVISION = "torchvision."   # arch "torchvision.<name>": any torchvision classification model
