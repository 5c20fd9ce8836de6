"""``nnunet-selfreg analyze``: what a trained U-Net's stages represent (CKA, SCR, redundancy, Grad-CAM)."""
