// Error messages of the argument checks, built without formatting numbers through iostreams.
//
// Why: on the lent H100 image (torch 2.11, the extension built by the image's /opt/gcc), every check whose
// message formatted an integer or a shape with c10::str (std::ostringstream << int64_t) killed the process
// with SIGSEGV instead of raising, while messages of text, dtypes and devices raised as they should
// (tests/gpu_repro_bad_rows.py; bench/gpu_check.sh, 2026-11-27). Numbers are therefore turned into text here
// (std::to_string, snprintf: no locale facets), and c10::str only ever sees strings; the messages read the
// same as c10::str would print them ("[2, 3]" for a shape, "%g" for a double, 0 / 1 for a bool).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/StringUtil.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace fastlora {

template <typename T>
void append_to_message(std::string& out, const T& value) {
  using U = std::decay_t<T>;
  if constexpr (std::is_same_v<U, bool>) {
    out += value ? "1" : "0";
  } else if constexpr (std::is_integral_v<U>) {
    out += std::to_string(value);
  } else if constexpr (std::is_floating_point_v<U>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(value));
    out += buf;
  } else if constexpr (std::is_convertible_v<const T&, c10::string_view>) {
    const c10::string_view text(value);
    out.append(text.data(), text.size());
  } else if constexpr (std::is_convertible_v<const T&, c10::IntArrayRef>) {
    const c10::IntArrayRef sizes(value);
    out += '[';
    for (size_t i = 0; i < sizes.size(); ++i) {
      if (i) out += ", ";
      out += std::to_string(sizes[i]);
    }
    out += ']';
  } else {
    out += c10::str(value);  // ScalarType, Device, ...: printed by libtorch's own operator<<
  }
}

// The concatenation of the pieces, each as text.
template <typename... Pieces>
std::string message(const Pieces&... pieces) {
  std::string out;
  (append_to_message(out, pieces), ...);
  return out;
}

}  // namespace fastlora

// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE / TORCH_CHECK with the message built by fastlora::message (only when the
// check fails: the message is an argument of the throw, as in torch's macros).
#define FASTLORA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::fastlora::message(__VA_ARGS__))
#define FASTLORA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::fastlora::message(__VA_ARGS__))
#define FASTLORA_CHECK(cond, ...) TORCH_CHECK(cond, ::fastlora::message(__VA_ARGS__))
