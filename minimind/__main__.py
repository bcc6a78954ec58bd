from minimind.cli import main

raise SystemExit(main())
