"""The networks, one file each, with the paper they implement and the checkpoint layout they load strictly:
efficientnet_lite (EfficientNet-Lite0), cvnet_resnet (CVNet's ResNet-50/101), ames_transformer (the AMES
transformer) and ames_detector (AMES's local-feature detector). The describers in visearch/models/ use them."""
