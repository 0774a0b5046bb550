# Hugging Face tokenizer.json (byte-level BPE) in plain C++: PCRE2 for the pre-tokenizer regexes, utf8proc for NFC.
# No LibTorch, so tools and benchmarks can link it alone. Included from model/CMakeLists.txt.
# Optional outside the btx tree (a GPU machine building model/ against a pip LibTorch may lack the two -dev
# packages): without them btx_model refuses tokenizer.json files by name instead.
find_package(PkgConfig REQUIRED)
pkg_check_modules(BTX_PCRE2 IMPORTED_TARGET libpcre2-8)
pkg_check_modules(BTX_UTF8PROC IMPORTED_TARGET libutf8proc)
if(NOT BTX_PCRE2_FOUND OR NOT BTX_UTF8PROC_FOUND)
  message(STATUS "btx: no libpcre2-8 / libutf8proc: built without Hugging Face tokenizer.json support")
  return()
endif()

add_library(btx_hf_tokenizer STATIC ${CMAKE_CURRENT_LIST_DIR}/hf_tokenizer.cc)
target_include_directories(btx_hf_tokenizer PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(btx_hf_tokenizer
  PUBLIC btx_contract
  PRIVATE nlohmann_json::nlohmann_json PkgConfig::BTX_PCRE2 PkgConfig::BTX_UTF8PROC Threads::Threads)
set_target_properties(btx_hf_tokenizer PROPERTIES POSITION_INDEPENDENT_CODE ON)

# btx_hf_tokenize: ids of NUL-separated documents, for tests/python/tokenizers_hf.py (and by hand).
add_executable(btx_hf_tokenize ${CMAKE_CURRENT_LIST_DIR}/hf_tokenize_main.cc)
target_link_libraries(btx_hf_tokenize PRIVATE btx_hf_tokenizer)

if(BTX_TESTS)
  add_executable(btx_hf_tokenizer_tests ${CMAKE_CURRENT_LIST_DIR}/hf_tokenizer_test.cc)
  target_link_libraries(btx_hf_tokenizer_tests PRIVATE btx_hf_tokenizer nlohmann_json::nlohmann_json GTest::gtest_main)
  gtest_discover_tests(btx_hf_tokenizer_tests PROPERTIES LABELS unit DISCOVERY_TIMEOUT 60)

  # Token-for-token identity with the Python `tokenizers` library (label "interop"): trains small GPT-2, Llama 3,
  # Qwen2 and SmolLM-style tokenizers at test time, nothing downloaded but the pinned wheel; 77 = PyPI unreachable.
  add_test(NAME tokenizers_hf
    COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/../tests/python/tokenizers_hf.py
            --venv ${CMAKE_BINARY_DIR}/pyenv-tokenizers --tool $<TARGET_FILE:btx_hf_tokenize>
            --workdir ${CMAKE_CURRENT_BINARY_DIR}/tokenizers-work)
  set_tests_properties(tokenizers_hf PROPERTIES LABELS interop SKIP_RETURN_CODE 77 TIMEOUT 600)
endif()
