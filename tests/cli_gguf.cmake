# ctest script: the GGUF export and import refuse bad input with one line that names the thing, and write nothing.
set(dir ${CMAKE_CURRENT_BINARY_DIR}/cli_gguf)
file(REMOVE_RECURSE ${dir})
file(MAKE_DIRECTORY ${dir})
execute_process(COMMAND ${BIN} init --config ${SRC}/configs/tiny.json --out ${dir}/init --dtype fp32
                OUTPUT_QUIET ERROR_QUIET RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "init failed (${rc})")
endif()
# Each case: arguments, and the text the error line must hold.
function(expect_error name pattern)
  execute_process(COMMAND ${BIN} ${ARGN} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  string(STRIP "${err}" err)
  if(rc EQUAL 0 OR NOT err MATCHES "${pattern}" OR err MATCHES "terminate called|what\\(\\)")
    message(FATAL_ERROR "${name}: expected an error matching '${pattern}' (rc ${rc}), got: ${err}")
  endif()
  message(STATUS "${name}: ${err}")
endfunction()
expect_error("folder as --out" "--format gguf writes one file"
             export --checkpoint ${dir}/init --format gguf --out ${dir})
expect_error("unknown --type" "--type \"q5_k\": expected f32, f16, bf16, q8_0 or q4_0"
             export --checkpoint ${dir}/init --format gguf --type q5_k --out ${dir}/m.gguf)
# tiny.json's tokenizer path does not exist under the test folder: a GGUF needs its vocabulary.
execute_process(COMMAND ${CMAKE_COMMAND} -E chdir ${dir} ${BIN} export --checkpoint ${dir}/init --format gguf
                        --out ${dir}/m.gguf ERROR_VARIABLE err RESULT_VARIABLE rc)
if(rc EQUAL 0 OR NOT err MATCHES "tokenizer \".*\" \\(data.tokenizer of the checkpoint\\) does not exist")
  message(FATAL_ERROR "export without its tokenizer: rc ${rc}, ${err}")
endif()
if(EXISTS ${dir}/m.gguf OR EXISTS ${dir}/m.gguf.tmp)
  message(FATAL_ERROR "a failed GGUF export left a file behind")
endif()
# A broken GGUF: import and the other commands name it.
file(WRITE ${dir}/cut.gguf "GGUF and then not a header at all")
expect_error("broken import" "cut.gguf\": (truncated header|GGUF version|file of)"
             export --checkpoint ${dir}/cut.gguf --out ${dir}/imported)
expect_error("score of a GGUF" "is a GGUF file; hint: import it into a checkpoint folder first"
             score --checkpoint ${dir}/cut.gguf --text hello)
