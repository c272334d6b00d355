from tritonkv.core.proc import main

raise SystemExit(main())
