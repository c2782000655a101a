# ctest script: `omnilite info` on the full config and the card; the totals must meet the card's claims and agree.
execute_process(COMMAND ${BIN} info --config ${SRC}/configs/omni-lite.json --json
                OUTPUT_VARIABLE out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "omnilite info failed (${rc}): ${out}")
endif()
string(JSON total GET "${out}" total_params)
string(JSON active GET "${out}" active_params_backbone)
message(STATUS "total_params=${total} active_params_backbone=${active}")
if(total LESS 2400000000 OR total GREATER 2600000000)
  message(FATAL_ERROR "total_params ${total} outside [2.4B, 2.6B]")
endif()
if(active LESS 465000000 OR active GREATER 495000000)
  message(FATAL_ERROR "active_params_backbone ${active} outside [465M, 495M]")
endif()
execute_process(COMMAND ${BIN} info --spec ${SRC}/docs/spec/omni-lite.spec.json --json
                OUTPUT_VARIABLE spec_out RESULT_VARIABLE rc)
string(JSON spec_total GET "${spec_out}" total_params)
if(NOT rc EQUAL 0 OR NOT spec_total EQUAL total)
  message(FATAL_ERROR "info --spec gave ${spec_total} (rc ${rc}), --config gave ${total}")
endif()
# Progress lines go to stderr: stdout holds a command's result alone (here: init prints nothing else).
file(REMOVE_RECURSE ${CMAKE_CURRENT_BINARY_DIR}/cli_info_init)
execute_process(COMMAND ${BIN} init --config ${SRC}/configs/tiny.json --out ${CMAKE_CURRENT_BINARY_DIR}/cli_info_init
                        --dtype fp32
                OUTPUT_VARIABLE init_out ERROR_VARIABLE init_err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR NOT init_out STREQUAL "" OR NOT init_err MATCHES "init: ")
  message(FATAL_ERROR "init: progress must go to stderr only (rc ${rc}); stdout: '${init_out}' stderr: '${init_err}'")
endif()
execute_process(COMMAND ${BIN} info --config /nonexistent.json ERROR_VARIABLE err RESULT_VARIABLE rc)
if(rc EQUAL 0 OR NOT err MATCHES "cannot open file")
  message(FATAL_ERROR "a missing config must fail with a clear error, got rc ${rc}: ${err}")
endif()
