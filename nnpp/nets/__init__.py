from nnpp.nets.unetpp import UNetPlusPlus, UNetPlusPlusDecoder

__all__ = ["UNetPlusPlus", "UNetPlusPlusDecoder"]
