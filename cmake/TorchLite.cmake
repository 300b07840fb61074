# Locate the torch that the build interpreter imports and expose it as the INTERFACE target
# `mage_torch`. We ask Python instead of find_package(Torch): the latter needs several hand-set hints
# for pip-installed CUDA builds.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "
import glob, os, torch
d = os.path.dirname(torch.__file__)
site = os.path.dirname(d)
inc = sorted(glob.glob(os.path.join(site, 'nvidia', '*', 'include')) + glob.glob(os.path.join(site, 'nvidia', '*', '*', 'include')))
print(d, int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.version.cuda or '', torch.__version__, ';'.join(inc), sep='\\n')
"
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "`import torch` failed in ${Python_EXECUTABLE}. Install torch first and build with "
                      "`pip install . --no-build-isolation` (torch is not a build requirement on purpose).")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_DIR)
list(GET _torch_info 1 TORCH_CXX11_ABI)
list(GET _torch_info 2 TORCH_CUDA_VERSION)
list(GET _torch_info 3 TORCH_VERSION)
list(LENGTH _torch_info _n)
set(TORCH_NVIDIA_INCLUDES "")
if(_n GREATER 4)
  list(SUBLIST _torch_info 4 -1 TORCH_NVIDIA_INCLUDES)
endif()
message(STATUS "torch ${TORCH_VERSION} at ${TORCH_DIR} (cxx11 abi ${TORCH_CXX11_ABI}, cuda '${TORCH_CUDA_VERSION}')")

add_library(mage_torch INTERFACE)
target_include_directories(mage_torch SYSTEM INTERFACE
  "${TORCH_DIR}/include" "${TORCH_DIR}/include/torch/csrc/api/include")
target_compile_definitions(mage_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})
foreach(_lib c10 torch torch_cpu)
  find_library(MAGE_LIB_${_lib} ${_lib} PATHS "${TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(mage_torch INTERFACE "${MAGE_LIB_${_lib}}")
endforeach()
