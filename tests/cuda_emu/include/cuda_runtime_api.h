// CPU emulation stand-in for the CUDA header of this name (tests only): see fastlora_cuda_emu.h.
#pragma once
#include "fastlora_cuda_emu.h"
