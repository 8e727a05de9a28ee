// Emulator stand-in for <cuda_runtime.h> (see vos_emu/runtime.h).
#pragma once
#include "vos_emu/runtime.h"
