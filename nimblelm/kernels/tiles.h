// The AMX tile configuration (palette 1) that each op using tiles loads in each of its threads.
#pragma once

#include <cstdint>

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
